"""Execute the tour notebooks (ARCHITECTURE.md: "notebooks/ — tours that import only the public API; executed by the
tests") and check values they compute.

Each notebook runs top to bottom in a fresh kernel on *this* interpreter (the venv that runs pytest, whatever kernel
specs are installed globally), with a temporary working directory. A probe cell appended to the notebook prints a
JSON summary of the notebook's own variables, which the test checks: a notebook that runs but computes the wrong
thing fails. Deselect with ``-m "not notebook and not gpu and not slow"`` (a command-line ``-m`` replaces the one in
``addopts``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PROBE_PREFIX = "NOTEBOOK_PROBE "


class ThisInterpreterKernels(KernelSpecManager):
    """Resolves every kernel name to ipykernel on ``sys.executable``: no global ``ipykernel install`` needed, and a
    ``python3`` spec from another environment can never be picked up instead of the venv."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            resource_dir="",
        )


def run_notebook(name: str, probe: str, workdir: Path) -> dict:
    """Execute ``notebooks/<name>`` plus a final ``probe`` cell (an expression giving a JSON-able dict); return it.

    Raises ``nbclient.exceptions.CellExecutionError`` (with the failing cell and traceback) if any cell errors.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not stored, f"{name}: commit notebooks with outputs cleared ({len(stored)} code cells hold outputs)"
    code = (
        "import json as _json, os as _os, sys as _sys\n"
        f"_probe = {probe.strip()}\n"
        "_probe.update(executable=_sys.executable, cwd=_os.getcwd())\n"
        f"print({PROBE_PREFIX!r} + _json.dumps(_probe))"
    )
    nb.cells.append(nbformat.v4.new_code_cell(code))
    km = AsyncKernelManager(
        kernel_name="python3",
        kernel_spec_manager=ThisInterpreterKernels(),
        connection_file=str(workdir / "kernel.json"),
    )
    client = nbclient.NotebookClient(
        nb, km=km, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    # The kernel's temporary files go under ``workdir`` too, so a notebook's ``tempfile.mkdtemp()`` is removed with
    # pytest's temporary directories instead of accumulating in the system's.
    scratch = workdir / "tmp"
    scratch.mkdir(exist_ok=True)
    client.execute(env={**os.environ, "TMPDIR": str(scratch)})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith(PROBE_PREFIX)]
    assert len(lines) == 1, f"{name}: probe cell printed {text!r}"
    values = json.loads(lines[0][len(PROBE_PREFIX) :])
    # The kernel is the interpreter running the tests (the venv), in the temporary working directory.
    assert values["executable"] == sys.executable
    assert os.path.realpath(values["cwd"]) == os.path.realpath(workdir)
    return values


def test_01_stream_and_masks(tmp_path: Path) -> None:
    probe = """{
        "modalities": [row[4].name for row in batch.splits.rows()],
        "intents": [tok.decode([label]) for p, label in zip(batch.ce_indices.tolist(), batch.ce_labels.tolist())
                    if int(batch.input_ids[p]) in markers and label in markers],
        "block_equals_dense": bool(block_equals_dense),
        "same_as_create_block_mask": bool(same_tensors),
        "dense_equals_reference": bool(torch.equal(dense, reference_mask(batch.splits))),
        "picture_shape": list(picture.shape),
        "seq_len": batch.seq_len,
        "two_keys": two.sample_keys,
        "two_seq_len": two.seq_len,
        "two_real": two.num_real_tokens,
        "measured": packer.measure(sample) + packer.measure(second),
    }"""
    v = run_notebook("01_stream_and_masks.ipynb", probe, tmp_path)
    text, noised, clean, vit = "TEXT", "VAE_NOISED", "VAE_CLEAN", "VIT"
    # user text | gen0: noised, clean, ViT | user text | assistant text | gen1: noised, clean, ViT | user | assistant
    assert v["modalities"] == [text, noised, clean, vit, text, text, noised, clean, vit, text, text]
    # SPEC §2: user im_e -> v_s (reply is an image); gen0's ViT v_e -> end; user -> im_s; text im_e -> v_s (gen1);
    # gen1's ViT v_e -> end; user -> im_s; last text im_e -> end.
    s, v_s, end = "<|im_start|>", "<|vision_start|>", "<|end|>"
    assert v["intents"] == [v_s, end, s, v_s, end, s, end]
    assert v["block_equals_dense"] and v["same_as_create_block_mask"] and v["dense_equals_reference"]
    assert v["picture_shape"] == [3, v["seq_len"], v["seq_len"]]
    assert v["two_keys"] == ["tour-0", "tour-1"]
    assert v["two_seq_len"] == 240 and v["two_real"] == v["measured"] < 240


def test_02_shapeschat_and_synthesis(tmp_path: Path) -> None:
    probe = """{
        "detector_exact": detector_exact,
        "perfect": perfect.as_dict(),
        "partial": partial.as_dict(),
        "written": [report.written, again.written, more.written],
        "read_back": len(samples),
        "shards": sorted(p.name for p in out_dir.glob("*.tar")),
        "out_dir": str(out_dir),
        "truth_ok": [sum(truth_ok), len(truth_ok)],
        "chosen_distance": distance_of(chosen),
        "task_shares_sum": sum(summary["shares"]["task"].values()),
    }"""
    v = run_notebook("02_shapeschat_and_synthesis.ipynb", probe, tmp_path)
    assert v["detector_exact"]
    assert v["perfect"]["exact"] == 1.0 and v["perfect"]["accuracy"] == 1.0
    # one object recoloured + noise: colour loses credit, every other attribute keeps it (partial credit)
    partial = v["partial"]
    assert partial["colour"] < 1.0 and partial["exact"] == 0.0
    assert partial["shape"] == partial["size"] == partial["position"] == partial["count"] == 1.0
    assert 0.5 < partial["accuracy"] < 1.0
    assert v["written"] == [10, 10, 15] and v["read_back"] == 15
    assert v["shards"] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert not Path(v["out_dir"]).resolve().is_relative_to(Path.cwd().resolve())  # nothing written into the repo
    good, total = v["truth_ok"]
    assert good == total > 15  # every image of every dialogue detects back to its recorded scene
    assert v["chosen_distance"] >= 2
    assert v["task_shares_sum"] == pytest.approx(1.0)


def test_03_model_and_training_step(tmp_path: Path) -> None:
    probe = """{
        "logits": list(out.logits.shape),
        "ce_positions": batch.ce_indices.numel(),
        "vocab": tok.vocab_size,
        "ce": [before.ce.item(), after.ce.item()],
        "mse": [before.mse.item(), after.mse.item()],
        "accuracy": [accuracy_before, accuracy_after],
        "steps": len(history),
        "autoencoder_frozen": not any(p.requires_grad for p in model.vae.autoencoder.parameters()),
    }"""
    v = run_notebook("03_model_and_training_step.ipynb", probe, tmp_path)
    assert v["logits"] == [v["ce_positions"], v["vocab"]]
    assert v["steps"] == 30 and v["autoencoder_frozen"]
    ce_before, ce_after = v["ce"]
    mse_before, mse_after = v["mse"]
    assert ce_after < 0.5 * ce_before  # on the same fixed flow draw, before vs after training
    assert mse_after < 0.8 * mse_before
    assert v["accuracy"][1] > v["accuracy"][0]


def test_04_chat_session(tmp_path: Path) -> None:
    probe = """{
        "intents": [reply.intents, edited.intents, answer.intents, redo.intents],
        "answer": [answer.text, script.turns[5].text],
        "roles": [turn.role.value for turn in session.dialogue.turns],
        "packed_vs_cache": [packed.seq_len, cache_tokens, int(packed.position_ids.max()) + 1, cache_position],
        "image_uncond": [session.contexts.image_uncond.num_tokens, session.contexts.image_uncond.position],
        "full": [session.contexts.full.num_tokens, session.contexts.full.position],
        "redo_differs": not torch.equal(redo.images[0], edited.images[0]),
        "same_prediction": bool(same_prediction),
        "reloaded_turns": restored.num_turns,
    }"""
    v = run_notebook("04_chat_session.ipynb", probe, tmp_path)
    # The model learnt when to answer with a picture and when with text (SPEC §2: intent is predicted).
    assert v["intents"] == [["image", "end"], ["image", "end"], ["text", "end"], ["image", "end"]]
    assert v["answer"][0] == v["answer"][1]
    assert v["roles"] == ["user", "assistant"] * 2  # turns 4-5 were rolled back, the edit redone
    tokens, cached, next_position, cache_position = v["packed_vs_cache"]
    assert tokens == cached and next_position == cache_position
    # image-unconditional context: the last request attached no image and generated images are never dropped (what CFG
    # training dropout teaches, SPEC §4), so it is the full context
    assert v["image_uncond"] == v["full"]
    assert v["redo_differs"] and v["same_prediction"] and v["reloaded_turns"] == 4
