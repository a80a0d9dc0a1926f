"""The broker's pure core: events in, actions out (see core.py)."""
from lmx.broker.core.core import Core  # noqa: F401
from lmx.broker.core.state import BrokerConfig  # noqa: F401
