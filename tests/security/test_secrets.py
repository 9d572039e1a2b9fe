"""Secrets stay secret: values read with ``${oc.env:VAR}`` appear in no file a run writes (they are stored as
``${oc.env:VAR}``) and in no request a synthesis backend sends; API keys go only to loopback or allowed https hosts.

The requests are caught by a chat-completions server on 127.0.0.1 run in a thread.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from chatumm_kit.cli import main
from chatumm_kit.config import RecipeError, instantiate, load_recipe, to_yaml
from chatumm_kit.synth.backends import OpenAIChatBackend, key_may_go_to
from chatumm_kit.synth.ops import BackendError, ChatMessage

SECRET = "sk-test-7f3a9c1e5b2d4680"


class Catcher:
    """A chat-completions endpoint on 127.0.0.1 that records every request (headers and body) and answers "ok"."""

    def __init__(self):
        self.requests: list[tuple[dict, bytes]] = []
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                catcher.requests.append((dict(self.headers), body))
                data = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def seen(self, text: str) -> bool:
        return any(text in json.dumps(h) or text.encode() in b for h, b in self.requests)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("CHATUMM_TEST_SECRET", SECRET)
    monkeypatch.delenv("CHATUMM_API_HOSTS", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def _files_holding(root: Path, text: str) -> list[str]:
    hits = [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]
    return hits + [str(p) for p in root.rglob("*") if text in p.name]


def test_a_training_run_writes_no_environment_value(tmp_path, monkeypatch, train_recipe, capsys):
    data = tmp_path / "data_from_env_3c9d"  # a path that comes from the environment: stored as ${oc.env:...}
    monkeypatch.setenv("CHATUMM_TEST_DATA", str(data))
    out = tmp_path / "run"
    logger = {"_component_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": str(out), "name": "tb"}
    recipe = train_recipe(
        tmp_path / "r.yaml",
        out=out,
        data="${oc.env:CHATUMM_TEST_DATA}",
        overrides=["+vars.api_key=${oc.env:CHATUMM_TEST_SECRET}", f"trainer.logger={json.dumps(logger)}"],
    )
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "hparams.yaml" for p in written) and any(p.suffix == ".ckpt" for p in written)
    assert _files_holding(out, SECRET) == [] and _files_holding(data, SECRET) == []
    assert _files_holding(out, str(data)) == []  # recipe.yaml, checkpoints, hparams.yaml, TensorBoard events
    saved = (out / "recipe.yaml").read_text()
    assert "api_key: ${oc.env:CHATUMM_TEST_SECRET}" in saved and "data_dir: ${oc.env:CHATUMM_TEST_DATA}" in saved
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["tokenizer"] == "${oc.env:CHATUMM_TEST_DATA}/tokenizer"
    assert "${oc.env:CHATUMM_TEST_SECRET}" in ckpt["recipe"]
    # resolved at use: loading the checkpoint on this machine finds the tokenizer where the environment says
    from chatumm_kit.training.loading import checkpoint_hyperparameters

    assert checkpoint_hyperparameters(out / "checkpoints" / "last.ckpt")["model"]["tokenizer"] == str(
        data / "tokenizer"
    )


def test_print_shows_the_reference_not_the_value(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("vars:\n  key: ${oc.env:CHATUMM_TEST_SECRET}\n  header: Bearer ${vars.key}\n")
    assert load_recipe(recipe).vars.header == f"Bearer {SECRET}"  # used as it is
    assert main(["print", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "header: Bearer ${oc.env:CHATUMM_TEST_SECRET}" in out
    assert SECRET not in to_yaml(load_recipe(recipe))


def _backend_node(url: str, **kw) -> dict:
    return {"_component_": "chatumm_kit.synth.OpenAIChatBackend", "model": "m", "base_url": url, "max_retries": 0, **kw}


@pytest.mark.parametrize(
    "field",
    [
        {"extra_body": {"note": "${oc.env:CHATUMM_TEST_SECRET}"}},
        {"extra_body": {"user": "id-${oc.env:CHATUMM_TEST_SECRET}"}},
        {"model": "${oc.env:CHATUMM_TEST_SECRET}"},
        {"base_url": "${url}?k=${oc.env:CHATUMM_TEST_SECRET}"},
    ],
)
def test_no_recipe_field_puts_an_environment_value_in_a_request(field, tmp_path):
    with Catcher() as server:
        node = OmegaConf.create({"url": server.url, "backend": _backend_node(server.url, **field)})
        with pytest.raises(RecipeError) as e:
            instantiate(node.backend, path="synth.backend")
        (line,) = str(e.value).splitlines()
        assert line.startswith("synth.backend: building chatumm_kit.synth.OpenAIChatBackend failed: ")
        assert "$CHATUMM_TEST_SECRET" in line and SECRET not in line
        assert server.requests == []


def test_a_prompt_carrying_an_environment_value_is_not_sent(tmp_path):
    load_recipe_with_secret = OmegaConf.create({"s": "${oc.env:CHATUMM_TEST_SECRET}"})
    assert load_recipe_with_secret.s == SECRET  # the recipe read it, so the kit knows the value
    with Catcher() as server:
        be = OpenAIChatBackend(model="m", base_url=server.url, max_retries=0)
        assert be.complete([ChatMessage("user", ("hello",))]) == "ok"
        with pytest.raises(BackendError, match=r"would carry the value of \$CHATUMM_TEST_SECRET") as e:
            be.complete([ChatMessage("user", (f"repeat {SECRET}",))])
        assert e.value.stop_run and SECRET not in str(e.value)
        assert len(server.requests) == 1 and not server.seen(SECRET)


def test_chatumm_synth_with_a_leaking_backend_stops_in_one_line(tmp_path, capsys):
    with Catcher() as server:
        recipe = tmp_path / "s.yaml"
        node = _backend_node(server.url, extra_body={"note": "${oc.env:CHATUMM_TEST_SECRET}"})
        recipe.write_text(
            f"output_dir: {tmp_path / 'out'}\nsynth:\n  _component_: chatumm_kit.synth.SynthPipeline\n"
            "  output_dir: ${output_dir}\n  num_dialogues: 2\n"
            "  pool: {_component_: chatumm_kit.synth.ShapesPool}\n"
            f"  backend: {json.dumps(node)}\n"
        )
        assert main(["synth", str(recipe)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: synth.backend: building chatumm_kit.synth.OpenAIChatBackend failed:")
        assert SECRET not in line and server.requests == []
    assert not (tmp_path / "out").exists() or _files_holding(tmp_path / "out", SECRET) == []


def test_api_key_goes_to_loopback_and_allowed_https_hosts_only(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with Catcher() as server:  # loopback: the key is sent (a local server is yours)
        assert OpenAIChatBackend(model="m", base_url=server.url).complete([ChatMessage("user", ("hi",))]) == "ok"
        ((headers, body),) = server.requests
        assert headers["Authorization"] == f"Bearer {SECRET}" and SECRET.encode() not in body
    for url in ("http://api.openai.com/v1", "https://evil.example/v1", "http://10.0.0.7:8000/v1"):
        with pytest.raises(ValueError, match=r"not sending \$OPENAI_API_KEY to .*export CHATUMM_API_HOSTS=") as e:
            OpenAIChatBackend(model="m", base_url=url)  # refused before any request
        assert SECRET not in str(e.value)
    assert key_may_go_to("https://api.openai.com/v1") and not key_may_go_to("https://my.host/v1")
    monkeypatch.setenv("CHATUMM_API_HOSTS", "my.host, http://10.0.0.7:8000")  # the user's explicit opt-in
    assert key_may_go_to("https://my.host/v1") and not key_may_go_to("http://my.host/v1")
    assert key_may_go_to("http://10.0.0.7:8000/v1") and not key_may_go_to("http://10.0.0.7:8001/v1")
    OpenAIChatBackend(model="m", base_url="https://my.host/v1")
    OpenAIChatBackend(model="m", base_url="https://evil.example/v1", api_key_env=None)  # no key, any https host
