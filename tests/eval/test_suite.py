"""`chatumm eval RECIPE` with a suite recipe: a tiny trained chatumm_tiny checkpoint (real ChatSession replies, EMA and
raw weights as two models) on tiny files of every format, judged by a loopback judge. Every figure is recomputed by
hand from the recorded replies; a rerun asks the judge nothing; a killed run resumes without repeating a judged call;
report.html renders in headless Chromium with every picture."""

import base64
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from chatumm_kit.cli import main
from chatumm_kit.eval import SuiteReport, extract_choice, mme_answer, pope_answer, read_mmbench_tsv
from chatumm_kit.eval.loopback import LoopbackJudgeServer

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (230, 200, 0)]


def png(colour, size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_bench_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(COLOURS):
        (root / f"p{i}.png").write_bytes(png(c))
    b64 = [base64.b64encode(png(c)).decode() for c in COLOURS]

    def tsv(name, rows):
        with (root / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            w.writeheader()
            w.writerows(rows)
        return root / name

    files = {
        "mmbench": tsv("mmbench.tsv", [
            {"index": 0, "question": "What colour?", "hint": "nan", "A": "red", "B": "green", "C": "blue",
             "answer": "A", "category": "colour", "image": b64[0]},
            {"index": 1, "question": "Is it round?", "hint": "nan", "A": "yes", "B": "no", "C": "nan",
             "answer": "B", "category": "shape", "image": b64[2]}]),
        "mme": tsv("mme.tsv", [
            {"index": 0, "category": "existence", "image": b64[0], "question": "Is it red? Please answer yes or no.",
             "answer": "Yes"},
            {"index": 1, "category": "existence", "image": "0", "question": "Is it blue? Please answer yes or no.",
             "answer": "No"},
            {"index": 2, "category": "color", "image": b64[1], "question": "Is it green? Please answer yes or no.",
             "answer": "Yes"},
            {"index": 3, "category": "color", "image": "2", "question": "Is it red? Please answer yes or no.",
             "answer": "No"}]),
    }  # fmt: skip
    pope = root / "coco_pope_random.json"
    pope.write_text("".join(json.dumps({"question_id": i, "image": f"p{i}.png", "text": f"Is there a {w} in the image?",
                                        "label": lab}) + "\n" for i, (w, lab) in
                            enumerate([("square", "yes"), ("cat", "no"), ("circle", "yes")])))  # fmt: skip
    files["pope"] = pope
    vqa = root / "vqa.jsonl"
    vqa.write_text(
        json.dumps({"id": "v0", "image": "p0.png", "question": "What colour is it?", "answer": "red"})
        + "\n"
        + json.dumps({"id": "v1", "image": "p1.png", "question": "What colour?", "answer": "green"})
        + "\n"
    )
    files["vqa"] = vqa
    edit = root / "edit.jsonl"
    edit.write_text(
        "".join(
            json.dumps({"id": f"e{i}", "image": f"p{i}.png", "instruction": ins, "category": cat}) + "\n"
            for i, (ins, cat) in enumerate([("make it blue", "colour"), ("add a circle", "add")])
        )
    )
    files["edit"] = edit
    t2i = root / "t2i.jsonl"
    t2i.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "prompt": p}) + "\n"
            for i, p in enumerate(["a red circle", "a small green square in the top left"])
        )
    )
    files["t2i"] = t2i
    dialogues = root / "dialogues.jsonl"
    d0 = {
        "id": "d0",
        "turns": [
            {"role": "user", "segments": [{"type": "text", "text": "Draw a red circle."}]},
            {"role": "assistant", "segments": [{"type": "image", "image": "a"}]},
            {"role": "user", "segments": [{"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "segments": [{"type": "text", "text": "red"}]},
        ],
        "images": {"a": "p0.png"},
    }
    d1 = {"id": "d1", "turns": [
        {"role": "system", "segments": [{"type": "text", "text": "Answer in a few words."}]},
        {"role": "user", "segments": [{"type": "image", "image": "in"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "segments": [{"type": "text", "text": "A blue square."}]},
        {"role": "user", "segments": [{"type": "text", "text": "Make it green."}]},
        {"role": "assistant", "segments": [{"type": "image", "image": "out"}]},
        {"role": "user", "segments": [{"type": "text", "text": "Which colour was the first one?"}]},
        {"role": "assistant", "segments": [{"type": "text", "text": "Blue."}],
         "meta": {"tags": {"task": "understand", "output": "text", "distance": 1}}}],
        "images": {"in": "p2.png", "out": "p1.png"}}  # fmt: skip
    dialogues.write_text(json.dumps(d0) + "\n" + json.dumps(d1) + "\n")
    files["dialogues"] = dialogues
    return files


RECIPE = """\
output_dir: {out}
models:
  ema: {{_component_: chatumm_kit.eval.ModelSource, checkpoint: "{ckpt}", use_ema: true}}
  raw: {{_component_: chatumm_kit.eval.ModelSource, checkpoint: "{ckpt}", use_ema: false}}
judge:
  _component_: chatumm_kit.eval.Judge
  max_concurrency: 8
  cache: {out}/judge_cache.sqlite
  backend: {{_component_: chatumm_kit.synth.OpenAIChatBackend, model: loopback, base_url: "{url}", timeout_s: 10,
            max_retries: 1, backoff_s: 0.01, temperature: 0.0}}
settings:
  _component_: chatumm_kit.eval.SuiteSettings
  image_side: 32
  batch_size: 4
  reply:
    _component_: chatumm_kit.eval.ReplySettings
    max_new_tokens: 4
    max_segments: 2
    temperature: 1.0        # sampled (seeded) intents: the tiny model answers with words and with pictures
    sampler: {{_component_: chatumm_kit.inference.sampler.SamplerConfig, num_steps: 2}}
tasks:
{tasks}
"""

ALL_TASKS = """\
  mmbench: {{_component_: chatumm_kit.eval.MMBench, path: "{f[mmbench]}"}}
  mme: {{_component_: chatumm_kit.eval.MME, path: "{f[mme]}"}}
  pope: {{_component_: chatumm_kit.eval.POPE, paths: ["{f[pope]}"], image_root: "{root}"}}
  vqa: {{_component_: chatumm_kit.eval.VQAJsonl, path: "{f[vqa]}"}}
  edit: {{_component_: chatumm_kit.eval.EditBench, path: "{f[edit]}"}}
  t2i: {{_component_: chatumm_kit.eval.TextToImage, path: "{f[t2i]}"}}
  chat: {{_component_: chatumm_kit.eval.DialogueBench, dialogues: "{f[dialogues]}", success_score: 7}}
"""


def write_recipe(path, *, out, ckpt, url, files, root, tasks=ALL_TASKS, models=("ema", "raw")):
    text = RECIPE.format(out=out, ckpt=ckpt, url=url, tasks=tasks.format(f=files, root=root))
    if models == ("ema",):
        text = text.replace(f'  raw: {{_component_: chatumm_kit.eval.ModelSource, checkpoint: "{ckpt}", use_ema: '
                            "false}\n", "")  # fmt: skip
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def suite_run(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    files = write_bench_files(root / "data")
    server = LoopbackJudgeServer()
    recipe = write_recipe(root / "eval.yaml", out=root / "out", ckpt=trained_checkpoint, url=server.base_url,
                          files=files, root=root / "data")  # fmt: skip
    assert main(["eval", str(recipe)]) == 0
    yield {"root": root, "files": files, "server": server, "recipe": recipe, "hits": server.hits,
           "report": SuiteReport.load(root / "out" / "report.json"), "ckpt": trained_checkpoint}  # fmt: skip
    server.close()


def text_of(parts):
    return " ".join(p["text"] for p in parts if "text" in p)


def has_image(parts):
    return any("image" in p for p in parts)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def test_every_figure_equals_the_hand_computation(suite_run):
    report, files = suite_run["report"], suite_run["files"]
    assert list(report.models) == ["ema", "raw"] and report.models["ema"]["ema"] is True
    assert report.judge["model"] == "loopback" and set(report.judge["prompts"]) >= {"gedit", "reply_quality"}
    items = {e.dialogue_id: e for e in read_mmbench_tsv(files["mmbench"])}
    kinds = set()
    for model in report.models:
        # MMBench: CircularEval over the extracted choices
        r = report.tasks["mmbench"]["results"][model]
        assert len(r["turns"]) == 5  # 3 + 2 passes
        groups = {}
        for t in r["turns"]:
            e = items[t["dialogue_id"]]
            right = extract_choice(text_of(t["reply"]), e.meta["options"]) == e.meta["answer"]
            assert t["score"]["success"] == right
            groups.setdefault(t["dialogue_id"].split("/")[0], []).append(right)
        assert r["metrics"]["circular_acc"] == mean([float(all(v)) for v in groups.values()])
        # MME: acc and acc+ per subtask
        r = report.tasks["mme"]["results"][model]
        answers = {"0": "yes", "1": "no", "2": "yes", "3": "no"}
        right = {t["dialogue_id"]: mme_answer(text_of(t["reply"])) == answers[t["dialogue_id"]] for t in r["turns"]}
        for cat, ids in (("existence", ("0", "1")), ("color", ("2", "3"))):
            acc = 100 * sum(right[i] for i in ids) / 2
            assert r["categories"][cat]["acc"] == acc
            assert r["categories"][cat]["acc_plus"] == 100.0 * all(right[i] for i in ids)
        assert r["metrics"]["perception"] == sum(v["score"] for v in r["categories"].values())
        # POPE
        r = report.tasks["pope"]["results"][model]
        labels = ["yes", "no", "yes"]
        said = {t["dialogue_id"]: pope_answer(text_of(t["reply"])) for t in r["turns"]}
        said = [said[f"coco_pope_random/{i}"] for i in range(3)]
        assert r["metrics"]["accuracy"] == pytest.approx(mean([float(a == b) for a, b in zip(said, labels)]))
        assert r["metrics"]["yes_ratio"] == pytest.approx(said.count("yes") / 3)
        # judged edits: the loopback judge's scores from the instruction; no picture, no call and zeros
        r = report.tasks["edit"]["results"][model]
        sc, ov = [], []
        for t in r["turns"]:
            n = len({"e0": "make it blue", "e1": "add a circle"}[t["dialogue_id"]])
            if has_image(t["reply"]):
                assert t["score"]["verdict"]["scores"] == {"semantic_consistency": n % 11,
                                                           "perceptual_quality": 3 * n % 11}  # fmt: skip
                sc.append(n % 11)
                ov.append(math.sqrt((n % 11) * (3 * n % 11)))
                kinds.add("edit judged")
            else:
                assert t["score"].get("verdict") is None
                sc.append(0)
                ov.append(0.0)
        assert r["metrics"]["edit_semantic"] == pytest.approx(mean(sc))
        assert r["metrics"]["edit_overall"] == pytest.approx(mean(ov))
        assert set(r["categories"]) == {"colour", "add"}
        # text to image
        r = report.tasks["t2i"]["results"][model]
        prompts = {"t0": "a red circle", "t1": "a small green square in the top left"}
        want = [len(prompts[t["dialogue_id"]]) % 11 if has_image(t["reply"]) else 0 for t in r["turns"]]
        assert r["metrics"]["t2i_adherence"] == pytest.approx(mean(want))
        # multi-turn: intent exactly, reply quality (7 + 2k) % 11 with k the user turns of the history
        r = report.tasks["chat"]["results"][model]
        assert len(r["turns"]) == 5 and r["metrics"]["turns"] == 5
        quality, success = [], []
        for t in r["turns"]:
            s = t["score"]
            score = (7 + 2 * t["index"]) % 11
            assert s["verdict"]["scores"] == {"score": score} and s["verdict"]["reason"]
            intent = has_image(t["reply"]) == has_image(t["reference"]) and bool(text_of(t["reply"])) == bool(
                text_of(t["reference"])
            )
            assert s["intent"] == intent
            assert s["success"] == (intent and score >= 7)
            quality.append(score / 10)
            success.append(s["success"])
            kinds.add(s["predicted_output"])
        assert r["metrics"]["reply_quality"] == pytest.approx(mean(quality))
        assert r["metrics"]["success"] == pytest.approx(mean(success))
        assert r["metrics"]["judge_failed"] == 0.0
        runs = {f["dialogue_id"]: f for f in r["free_runs"]}
        for k in (1, 2):
            eligible = [f for f in runs.values() if f["num_turns"] >= k]
            survived = [f["num_turns"] if f["first_failure"] is None else f["first_failure"] for f in eligible]
            assert r["metrics"][f"sr@{k}"] == pytest.approx(mean([float(s >= k) for s in survived]))
        assert {t["dialogue_id"] for t in r["turns"]} == {"d0", "d1"}
        by_distance = r["extra"]["teacher_forced"]["by_distance"]
        assert set(by_distance) == {"none", "1"} and by_distance["1"]["intent"]["count"] == 1
    assert {"text", "image"} <= kinds  # the replies exercised both kinds of answers
    assert (suite_run["root"] / "out" / "plots" / "chat.png").stat().st_size > 1000


def test_missing_files_and_a_missing_judge_are_named_before_anything_runs(suite_run, capsys):
    recipe = str(suite_run["recipe"])
    assert main(["eval", recipe, "tasks.mme.path=nowhere/MME.tsv"]) == 2
    assert "tasks.mme.path: 'nowhere/MME.tsv' does not exist" in capsys.readouterr().err
    assert main(["eval", recipe, "~judge"]) == 2
    err = capsys.readouterr().err
    assert "tasks.edit: a judged task (edit); the recipe needs a 'judge' node" in err and "tasks.chat:" in err


def test_rerun_asks_the_judge_nothing_and_gives_the_same_report(suite_run, capsys):
    server = suite_run["server"]
    assert server.hits == suite_run["hits"] > 0
    assert main(["eval", str(suite_run["recipe"])]) == 0
    assert server.hits == suite_run["hits"]  # every verdict came from the cache
    assert "judge: 0 calls" in capsys.readouterr().out
    again = SuiteReport.load(suite_run["root"] / "out" / "report.json")
    assert again.tasks == suite_run["report"].tasks


def test_a_killed_run_resumes_without_repeating_a_judged_call(suite_run, tmp_path):
    tasks = ("  chat: {{_component_: chatumm_kit.eval.DialogueBench, dialogues: \"{f[dialogues]}\"}}\n"
             "  t2i: {{_component_: chatumm_kit.eval.TextToImage, path: \"{f[t2i]}\"}}\n")  # fmt: skip
    with LoopbackJudgeServer(block_after=3) as server:
        recipe = write_recipe(tmp_path / "eval.yaml", out=tmp_path / "out", ckpt=suite_run["ckpt"],
                              url=server.base_url, files=suite_run["files"], root=None, tasks=tasks,
                              models=("ema",))  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "chatumm_kit", "eval", str(recipe)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            assert server.blocked.wait(timeout=240), "the eval never reached its fourth judged call"
            import time

            time.sleep(0.5)  # answers already received reach the cache
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        first = list(server.answered)
        assert len(first) == 3 and not (tmp_path / "out" / "report.json").exists()
        server.release()
        assert main(["eval", str(recipe)]) == 0
        second = server.answered[3:]
    assert second and not set(first) & set(second)  # nothing answered twice
    report = SuiteReport.load(tmp_path / "out" / "report.json")
    full = suite_run["report"].tasks
    # the resumed run's verdicts are those of the uninterrupted run
    for task in ("chat", "t2i"):
        assert report.tasks[task]["results"]["ema"]["metrics"] == full[task]["results"]["ema"]["metrics"]
    n_calls = sum(t["score"].get("verdict") is not None for task in ("chat", "t2i")
                  for t in report.tasks[task]["results"]["ema"]["turns"])  # fmt: skip
    n_calls += sum(t["score"].get("verdict") is not None for f in report.tasks["chat"]["results"]["ema"]["free_runs"]
                   for t in f["turns"] if t["index"] > 0)  # fmt: skip
    assert len(first) + len(second) <= n_calls


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_report_html_renders_in_headless_chromium_with_every_picture(suite_run, tmp_path):
    html = suite_run["root"] / "out" / "report.html"
    text = html.read_text()
    assert 'src="images/' not in text and text.count("data:image/png;base64,") >= 10  # self-contained
    assert "reason" in text and "raw" in text and "ema" in text
    n_images = text.count("<img ")
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    base = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert f'data-images-loaded="{n_images}/{n_images}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1600", html.as_uri()], capture_output=True,
                   timeout=120, check=True)  # fmt: skip
    with Image.open(shot) as im:
        grey = im.convert("L")
        lo, hi = grey.getextrema()
        colours = len(set(im.convert("RGB").getdata()))
    assert hi - lo > 100 and colours > 20  # text, tables and pictures, not a blank page


def test_shapes_chat_as_a_suite_task_gives_the_exact_benchmarks_numbers(suite_run, tmp_path):
    from chatumm_kit.eval import (
        BenchmarkSettings,
        ModelSource,
        ReplySettings,
        ShapesChat,
        SuiteSettings,
        run_benchmark,
        run_suite,
    )
    from chatumm_kit.inference.sampler import SamplerConfig

    shards = str(Path(suite_run["ckpt"]).parents[2] / "data" / "train" / "index.json")
    reply = ReplySettings(max_new_tokens=4, max_segments=2, temperature=1.0, sampler=SamplerConfig(num_steps=2))
    model = ModelSource(checkpoint=str(suite_run["ckpt"]))
    suite = run_suite(models={"m": model}, tasks={"shapes": ShapesChat(shards=shards, max_dialogues=3)},
                      settings=SuiteSettings(image_side=32, reply=reply, batch_size=2), output_dir=tmp_path)  # fmt: skip
    exact = run_benchmark(models={"m": model}, shards=shards,
                          settings=BenchmarkSettings(max_dialogues=3, reply=reply, batch_size=2)).models["m"]  # fmt: skip
    r = suite.tasks["shapes"]["results"]["m"]
    assert [t["score"] for t in r["turns"]] == json.loads(json.dumps([t.to_dict() for t in exact.turns]))
    assert r["extra"]["free_running"] == json.loads(json.dumps(exact.free_running.to_dict()))
    assert r["metrics"]["success"] == exact.teacher_forced.overall.mean("success")
    assert len(exact.turns) > 3 and (tmp_path / "report.html").is_file()
