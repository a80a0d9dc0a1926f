#!/usr/bin/env python3
"""Three agents on two models, one task, through the OpenAI-compatible gateway.

A coder (SmolLM2-135M-Instruct) writes a function, a reviewer (Gemma 3 270M, given the ChatML
template by the broker's --chat-template) reviews it, the coder revises it in its own ongoing
conversation (its KV already holds the first turn: see cached_tokens), and a documenter
(SmolLM2) writes its docstring. Each agent is nothing but the stock `openai` SDK pointed at
the gateway, with its own session (X-Lmx-Session); each becomes an admitted lmx agent.

    pip install openai
    python examples/three_agents.py                     # starts a broker and a gateway itself
    python examples/three_agents.py --gateway http://127.0.0.1:8000/v1 --api-key KEY

The second form uses a running gateway whose config offers models named smol and gemma. The
test models are tiny, so the code they write is poor; the point is the plumbing: three
sessions, two models, one CUDA context (or CPU), prefix reuse, all in well under a minute.
"""
import contextlib
import os
import tempfile
import time

import click
import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("LMX_MODELS", os.path.join(ROOT, "models"))
SMOL = os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf")
STOPS = ["<|im_end|>", "<|im_start|>"]   # a base model given ChatML may write them as text
TASK = "Write a Python function is_palindrome(s) that ignores case and spaces."


class Agent:
    """One role: a model, a system prompt, and its own conversation on the gateway."""

    def __init__(self, client, name, model, system, max_tokens):
        self.client, self.name, self.model, self.max_tokens = client, name, model, max_tokens
        self.messages = [{"role": "system", "content": system}]

    def say(self, text):
        """Send one user message; print and return the reply (streamed as it comes)."""
        self.messages.append({"role": "user", "content": text})
        print(f"\n--- {self.name} ({self.model}) ---", flush=True)
        t0, parts, usage = time.perf_counter(), [], None
        stream = self.client.chat.completions.create(
            model=self.model, messages=self.messages, max_tokens=self.max_tokens,
            temperature=0.2, seed=7, stop=STOPS, stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Lmx-Session": f"three-agents-{self.name}"})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                print(parts[-1], end="", flush=True)
            usage = chunk.usage or usage
        reply = "".join(parts)
        self.messages.append({"role": "assistant", "content": reply})
        print(f"\n[{usage.prompt_tokens} prompt tokens, "
              f"{usage.prompt_tokens_details.cached_tokens} reused from this agent's KV, "
              f"{usage.completion_tokens} generated, {time.perf_counter() - t0:.1f} s]")
        return reply


def work(client, max_tokens):
    """The task: code, review, revision, documentation."""
    coder = Agent(client, "coder", "smol", "You are a Python programmer. Reply with code "
                  "only.", max_tokens)
    reviewer = Agent(client, "reviewer", "gemma", "You review Python code in one or two "
                     "sentences.", max_tokens)
    documenter = Agent(client, "documenter", "smol", "You write short docstrings.",
                       max_tokens)
    code = coder.say(TASK)
    review = reviewer.say(f"Review this code:\n{code}")
    code = coder.say(f"A reviewer said: {review}\nRevise the function.")
    documenter.say(f"Write a one-line docstring for:\n{code}")


@contextlib.contextmanager
def local_stack(threads):
    """A broker (gemma given ChatML) and a gateway on this machine, stopped afterwards."""
    from lmx.broker.launch import start_broker, stop
    from lmx.gateway.launch import GatewayProc, toml_config
    folder = tempfile.mkdtemp(prefix="lmx-three-")
    endpoint = f"ipc://{folder}/lmx.sock"
    log = open(os.path.join(folder, "broker.log"), "wb")
    broker, _ = start_broker(["--state-dir", os.path.join(folder, "state"), "--model-dir",
                              MODELS, "--threads", str(threads), "--chat-template",
                              f"{GEMMA}=chatml"], endpoint, stdout=log, stderr=log)
    gateway = None
    try:
        gateway = GatewayProc(folder, endpoint, toml_config({
            "smol": {"model": SMOL, "n_ctx": 2048}, "gemma": {"model": GEMMA, "n_ctx": 2048}}))
        print(f"broker {endpoint}, gateway {gateway.url} (logs in {folder})")
        yield gateway.url + "/v1"
    finally:
        if gateway:
            gateway.stop()
        stop(broker)
        log.close()


@click.command()
@click.option("--gateway", default=None, help="A running gateway's base URL (…/v1); by "
              "default a broker and a gateway are started for the run.")
@click.option("--api-key", default="none", show_default=True)
@click.option("--max-tokens", default=48, show_default=True)
@click.option("--threads", default=2, show_default=True, help="The started broker's threads.")
def main(gateway, api_key, max_tokens, threads):
    """Run the coder, reviewer and documenter on one task."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        url = gateway or stack.enter_context(local_stack(threads))
        work(openai.OpenAI(base_url=url, api_key=api_key, max_retries=0), max_tokens)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
