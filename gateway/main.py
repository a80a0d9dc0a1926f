"""`lmx-gateway`: OpenAI's HTTP API in front of an lmx broker (Starlette on uvicorn)."""
import logging

import click
import uvicorn

from lmx.common import config as lmx_config
from lmx.common import quotas
from lmx.common.probe import _curve
from lmx.gateway import config
from lmx.gateway.app import create_app

log = logging.getLogger("lmx.gateway")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", default=None, help="The broker's endpoint [default: the config's "
              f"gateway.broker, else {lmx_config.DEFAULT_ENDPOINT}].")
@click.option("--listen", default=None, help="HOST:PORT to serve HTTP on [default: the "
              f"config's gateway.listen, else {config.DEFAULT_LISTEN}]. A non-loopback host "
              "needs API keys in the config.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="TOML file: models, API keys, limits, idle timeout, CORS "
              "(see configs/gateway.example.toml).")
@click.option("--quotas", "quotas_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="The broker's quotas file (configs/quotas.example.toml): each "
              "client's key is accepted as an API key (with its models) and sent on to the "
              "broker, whose quotas for that client apply.")
@click.option("--curve-client-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp:// brokers: this client's zmq.auth secret key file.")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp:// brokers: the broker's public key file.")
@click.option("--log-level", default="INFO", show_default=True)
def main(broker, listen, config_path, quotas_path, curve_client_key, curve_server_key,
         log_level):
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health, each request a
    CHAT or DECODE of a session's agent on the broker."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config.load(config_path)
        if quotas_path is not None:
            config.add_quota_clients(cfg, quotas.load(quotas_path))
        host, port = config.parse_listen(listen or cfg.listen)
        config.check_exposure(cfg, host)
    except (config.ConfigError, quotas.QuotaFileError) as exc:
        raise click.UsageError(str(exc)) from None
    endpoint = broker or cfg.broker or lmx_config.DEFAULT_ENDPOINT
    if not cfg.models:
        log.warning("gateway: the config offers no models: every request will get 404")
    log.info("gateway: http://%s:%d -> broker %s (%d models, %s)", host, port, endpoint,
             len(cfg.models), f"{len(cfg.keys)} API keys" if cfg.keys else "no API keys")
    app = create_app(cfg, endpoint, _curve(curve_client_key, curve_server_key))
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
