"""The synthesis pipeline: records → stages → balanced, resumable webdataset shards (SPEC §6), and ``run_synth``.

Candidate dialogue ``i`` is made by running the stages on an empty draft; stage ``s`` gets its own
``random.Random`` seeded from ``(seed, i, stage name)``, so a candidate depends only on the seed, its index, the
data and the backend's answers (cached) — not on threads, not on what ran before, not on a crash.

Work goes in chunks of ``shard_size`` candidates. A chunk's candidates run in parallel (``workers`` threads) under one
frozen :class:`~.taxonomy.Steering`; their results are taken in index order, the accepted ones become one shard
(written atomically by :class:`~chatumm_kit.data.shards.DialogueShardWriter`), and only then is
``synth_state.json`` (balancer counts, report, next chunk) replaced atomically. A killed run therefore resumes at the
first uncommitted chunk and produces exactly the shards an uninterrupted run would have (a shard written just before
the kill but not yet recorded is removed and rewritten, identically). The run stops once ``num_dialogues`` are
written; rerunning with a larger ``num_dialogues`` appends to a finished run.

A dialogue that fails — an operation out of retries, a stage that drops it, even a bug in a user stage — is counted
with its reason in the report and skipped; the run goes on. Only a backend that cannot be reached (retries exhausted,
bad credentials) stops the run, before committing the chunk, with a message saying that a rerun resumes.

Files in ``output_dir``: ``{prefix}-NNNNNN.tar`` + ``index.json`` (the shards), ``synth_state.json``,
``report.json`` + ``report.png``, and ``llm_cache.sqlite`` (answers of the backend, when caching is on).

Example:
    >>> pipe = SynthPipeline(pool=pool, backend=backend, stages=[ChainStage()], output_dir="out",
    ...                      num_dialogues=100)  # doctest: +SKIP
    >>> report = pipe.run()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from chatumm_kit.config import RecipeError, instantiate, validate_recipe
from chatumm_kit.data.dialogue import DialogueError, DialogueSample
from chatumm_kit.data.shards import INDEX_NAME, DialogueShardWriter, ShardIndex
from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.draft import DialogueDraft, DropDialogue
from chatumm_kit.synth.ops import Backend, BackendError, Operation, OpFailed
from chatumm_kit.synth.runner import OpRunner
from chatumm_kit.synth.sources import RecordPool
from chatumm_kit.synth.stages import Stage, StageContext
from chatumm_kit.synth.taxonomy import MixBalancer, Steering, SynthReport, TaxonomyTargets, TurnTags

__all__ = [
    "SynthPipeline",
    "SynthAborted",
    "SynthState",
    "CandidateResult",
    "check_synth_recipe",
    "run_synth",
    "SYNTH_KEYS",
    "STATE_NAME",
]

logger = logging.getLogger(__name__)

STATE_NAME = "synth_state.json"
SYNTH_KEYS = frozenset({"seed", "output_dir", "synth"})


class SynthAborted(RuntimeError):
    """The run stopped early (backend unreachable); finished shards are kept and a rerun resumes."""


@dataclass
class CandidateResult:
    index: int
    sample: DialogueSample | None = None
    tags: list[TurnTags] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    stop: bool = False


@dataclass
class SynthState:
    """Progress of a run, replaced atomically after each committed chunk."""

    fingerprint: str
    next_chunk: int = 0
    next_index: int = 0
    written: int = 0
    shards: list[str] = field(default_factory=list)
    balancer: dict[str, dict[str, int]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "next_chunk": self.next_chunk,
            "next_index": self.next_index,
            "written": self.written,
            "shards": list(self.shards),
            "balancer": self.balancer,
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SynthState:
        return cls(
            fingerprint=str(d["fingerprint"]),
            next_chunk=int(d["next_chunk"]),
            next_index=int(d["next_index"]),
            written=int(d["written"]),
            shards=list(d.get("shards", [])),
            balancer=dict(d.get("balancer", {})),
            report=dict(d.get("report", {})),
            version=int(d.get("version", 1)),
        )


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


class SynthPipeline:
    """Synthesize ``num_dialogues`` dialogues from a record pool through stages into shards.

    Args:
        pool: where records come from (:class:`~.sources.DatasetPool`, :class:`~.shapes_source.ShapesPool`).
        backend: answers the atomic operations (an LLM client or :class:`~.shapes_backend.ShapesRuleBackend`).
        stages: run in order on each candidate, e.g. ``[ChainStage(), DistractorStage(), InterleaveStage()]``.
        output_dir: where shards, state, report and cache go; rerunning on it resumes.
        num_dialogues: dialogues to write (dropped candidates do not count).
        seed: the run's seed.
        shard_size: candidates per chunk (one shard per chunk, at most this many dialogues).
        workers: threads making candidates of a chunk in parallel (useful with a remote LLM).
        targets: the taxonomy mix to balance toward (None: no steering).
        steering_gain: how hard the steering pushes toward the targets.
        ops: operations replacing or adding to the registry's (e.g. a stricter ``caption2query``).
        max_attempts: tries per operation call before the dialogue is dropped.
        use_cache: keep backend answers in ``cache_path`` (default ``output_dir/llm_cache.sqlite``).
        max_candidates: stop after this many candidates even if fewer dialogues were written
            (default ``4 * num_dialogues``).
        prefix: shard file prefix and dialogue id prefix.
        image_format: ``png`` or ``jpg`` for the shards' images.
        report_png: also draw ``report.png`` (matplotlib) next to ``report.json``.
        progress: show a tqdm progress bar.

    Example:
        >>> pipe = SynthPipeline(pool=p, backend=b, stages=s, output_dir="out", num_dialogues=10)  # doctest: +SKIP
        >>> pipe.run().written  # doctest: +SKIP
        10
    """

    def __init__(
        self,
        *,
        pool: RecordPool,
        backend: Backend,
        stages: Sequence[Stage],
        output_dir: str | Path,
        num_dialogues: int,
        seed: int = 0,
        shard_size: int = 256,
        workers: int = 1,
        targets: TaxonomyTargets | None = None,
        steering_gain: float = 4.0,
        ops: Mapping[str, Operation] | None = None,
        max_attempts: int = 3,
        use_cache: bool = True,
        cache_path: str | Path | None = None,
        max_candidates: int | None = None,
        prefix: str = "synth",
        image_format: str = "png",
        report_png: bool = True,
        progress: bool = True,
    ) -> None:
        if num_dialogues < 1:
            raise ValueError(f"SynthPipeline.num_dialogues must be >= 1, got {num_dialogues}")
        if shard_size < 1 or workers < 1:
            raise ValueError(f"SynthPipeline: shard_size ({shard_size}) and workers ({workers}) must be >= 1")
        if not stages:
            raise ValueError("SynthPipeline.stages is empty; the first stage must build dialogues (e.g. ChainStage)")
        for i, s in enumerate(stages):
            if not callable(s) or not isinstance(getattr(s, "name", None), str):
                raise TypeError(f"SynthPipeline.stages[{i}]: {s!r} is not a stage (a callable with a 'name')")
        self.pool = pool
        self.backend = backend
        self.stages = list(stages)
        self.output_dir = Path(output_dir)
        self.num_dialogues = int(num_dialogues)
        self.seed = int(seed)
        self.shard_size = int(shard_size)
        self.workers = int(workers)
        self.targets = targets or TaxonomyTargets()
        self.steering_gain = steering_gain
        self.ops = dict(ops or {})
        self.max_attempts = max_attempts
        self.use_cache = use_cache
        self.cache_path = Path(cache_path) if cache_path is not None else self.output_dir / "llm_cache.sqlite"
        self.max_candidates = int(max_candidates) if max_candidates is not None else 4 * self.num_dialogues
        self.prefix = prefix
        self.image_format = image_format
        self.report_png = report_png
        self.progress = progress
        self.runner: OpRunner | None = None

    # ------------------------------------------------------------------ identity
    def _stage_keys(self) -> list[str]:
        seen: Counter = Counter()
        keys = []
        for s in self.stages:
            keys.append(f"{s.name}#{seen[s.name]}")
            seen[s.name] += 1
        return keys

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption (output would no longer be one run's)."""
        blob = json.dumps(
            {
                "seed": self.seed,
                "shard_size": self.shard_size,
                "stages": self._stage_keys(),
                "model": str(getattr(self.backend, "model_id", type(self.backend).__name__)),
                "prefix": self.prefix,
                "targets": self.targets.to_dict(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ one candidate
    def make(self, index: int, steer: Steering, runner: OpRunner) -> CandidateResult:
        """Run every stage on candidate ``index``; never raises for a bad dialogue (the reason is returned)."""
        draft = DialogueDraft(id=f"{self.prefix}-{index:08d}", index=index, seed=self.seed)
        where = "start"
        try:
            for key, stage in zip(self._stage_keys(), self.stages):
                where = key
                ctx = StageContext(
                    pool=self.pool, ops=runner, rng=random.Random(f"{self.seed}:{index}:{key}"), steer=steer
                )
                out = stage(draft, ctx)
                if not isinstance(out, DialogueDraft):
                    raise DropDialogue("stage_output", f"{key} returned {type(out).__name__}, not a DialogueDraft")
                draft = out
            if not draft.exchanges:
                raise DropDialogue("empty_dialogue", "no stage added an exchange")
            where = "finalize"
            sample = draft.finalize()
            return CandidateResult(index=index, sample=sample, tags=draft.all_tags())
        except DropDialogue as e:
            return CandidateResult(index=index, reason=e.reason, detail=f"{where}: {e}")
        except OpFailed as e:
            return CandidateResult(
                index=index, reason=e.reason, detail=f"{where}: {e} | last answer: {e.last_answer!r}"
            )
        except BackendError as e:
            return CandidateResult(index=index, reason="backend_error", detail=f"{where}: {e}", stop=e.stop_run)
        except DialogueError as e:
            return CandidateResult(index=index, reason="invalid_dialogue", detail=f"{where}: {e}")
        except Exception as e:  # a bug in a stage must not cost the run its finished dialogues
            tb = traceback.format_exc(limit=3)
            return CandidateResult(index=index, reason=f"error:{where}:{type(e).__name__}", detail=f"{e}\n{tb}")

    # ------------------------------------------------------------------ state
    def _load_state(self) -> SynthState:
        path = self.output_dir / STATE_NAME
        fp = self.fingerprint()
        if not path.exists():
            if (self.output_dir / INDEX_NAME).exists():
                raise RecipeError(
                    f"{self.output_dir}: holds shards but no {STATE_NAME}; not a synth run to resume. "
                    "Use an empty output_dir."
                )
            return SynthState(fingerprint=fp)
        state = SynthState.from_dict(json.loads(path.read_text()))
        if state.fingerprint != fp:
            raise RecipeError(
                f"{self.output_dir}: holds a synth run with other settings (seed, shard_size, stages, model, prefix or "
                "targets changed); resume it with the same settings or use a new output_dir"
            )
        return state

    def _reconcile(self, state: SynthState) -> None:
        """Remove shards written after the last recorded commit (a kill between the two); they will be redone."""
        index_path = self.output_dir / INDEX_NAME
        committed = set(state.shards)
        if index_path.exists():
            index = ShardIndex.load(index_path)
            stale = [s.name for s in index.shards if s.name not in committed]
            if stale:
                logger.warning("%s: redoing uncommitted shard(s) %s", self.output_dir, stale)
                index.shards = [s for s in index.shards if s.name in committed]
                index.save(index_path)
        missing = [n for n in state.shards if not (self.output_dir / n).is_file()]
        if missing:
            raise RecipeError(f"{self.output_dir}: shards recorded as written are missing: {missing}")
        for p in self.output_dir.glob(f"{self.prefix}-*.tar"):
            if p.name not in committed:
                p.unlink()

    def _commit(self, state: SynthState, samples: list[DialogueSample]) -> None:
        if samples:
            with DialogueShardWriter(
                directory=self.output_dir,
                prefix=self.prefix,
                max_samples_per_shard=len(samples),
                image_format=self.image_format,
            ) as writer:
                for s in samples:
                    writer.write(s)
            state.shards.append(writer.index.shards[-1].name)
        _atomic_json(self.output_dir / STATE_NAME, state.to_dict())

    # ------------------------------------------------------------------ run
    def run(self) -> SynthReport:
        """Synthesize (or resume) until ``num_dialogues`` are written; returns the report (also written to disk)."""
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        self._reconcile(state)
        balancer = MixBalancer(targets=self.targets, gain=self.steering_gain)
        balancer.load_state_dict(state.balancer)
        report = SynthReport.from_dict(state.report) if state.report else SynthReport(targets=self.targets.to_dict())
        report.source_skips = dict(getattr(self.pool, "skip_counts", None) or {})
        report.source_skip_examples = list(getattr(self.pool, "skip_examples", None) or [])[:20]
        cache = AnswerCache(path=self.cache_path) if self.use_cache else None
        runner = OpRunner(backend=self.backend, cache=cache, ops=self.ops, max_attempts=self.max_attempts)
        self.runner = runner
        bar = tqdm(total=self.num_dialogues, initial=min(state.written, self.num_dialogues), desc="synth",
                   unit="dlg", disable=not self.progress)  # fmt: skip
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                while state.written < self.num_dialogues and state.next_index < self.max_candidates:
                    start = state.next_index
                    stop = min(start + self.shard_size, self.max_candidates)
                    steer = balancer.snapshot()
                    results = list(
                        pool.map(functools.partial(self.make, steer=steer, runner=runner), range(start, stop))
                    )
                    halt = next((r for r in results if r.stop), None)
                    if halt is not None:
                        raise SynthAborted(
                            f"the backend failed on candidate {halt.index} ({halt.detail}); {state.written} dialogues "
                            f"in {len(state.shards)} shard(s) are kept in {self.output_dir}; rerun to resume"
                        )
                    accepted: list[DialogueSample] = []
                    consumed = start
                    for r in results:
                        if state.written + len(accepted) >= self.num_dialogues:
                            break
                        consumed = r.index + 1
                        if r.sample is None:
                            report.add_failure(r.reason or "unknown", r.detail)
                            continue
                        accepted.append(r.sample)
                        balancer.add(r.tags)
                        report.add_dialogue(r.tags, n_turns=len(r.sample.dialogue.turns))
                    state.next_chunk += 1
                    state.next_index = consumed
                    state.written += len(accepted)
                    state.balancer = balancer.state_dict()
                    report.llm_answers = {"asked": runner.stats.calls, "from_cache": runner.stats.cache_hits}
                    state.report = report.to_dict()
                    self._commit(state, accepted)
                    report.write(self.output_dir, png=False)  # readable while the run goes on
                    bar.update(len(accepted))
                    bar.set_postfix(dropped=report.attempted - report.written)
        finally:
            bar.close()
            if cache is not None:
                cache.close()
        if state.written < self.num_dialogues:
            logger.warning(
                "synth stopped at max_candidates=%d with %d of %d dialogues written; see report.json for the reasons",
                self.max_candidates,
                state.written,
                self.num_dialogues,
            )
        report.llm_answers = {"asked": runner.stats.calls, "from_cache": runner.stats.cache_hits}
        report.write(self.output_dir, png=self.report_png)
        return report


def check_synth_recipe(cfg: DictConfig) -> None:
    """Everything ``chatumm validate`` can know about a synth recipe: a ``synth`` node, every node allowed and bound."""
    if "synth" not in cfg:
        raise RecipeError("synth: missing (a synth recipe needs a 'synth' node building a SynthPipeline)")
    validate_recipe(cfg)


def run_synth(cfg: DictConfig | Mapping[str, Any]) -> SynthReport:
    """``chatumm synth RECIPE``: build the recipe's ``synth`` node (a :class:`SynthPipeline`) and run it.

    A synth recipe has the top-level keys ``seed`` and ``output_dir`` (usually interpolated into the node) and
    ``synth``; any other top-level key is allowed as a place for shared nodes (``world``, ``phrasing``) that the
    ``synth`` node interpolates. Prints where the shards and the report went.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    check_synth_recipe(cfg)
    pipeline = instantiate(cfg.synth, path="synth")
    if not isinstance(pipeline, SynthPipeline):
        raise RecipeError(f"synth: built {type(pipeline).__name__}, expected a chatumm_kit.synth.SynthPipeline")
    # Rendering 32×32 scenes is dominated by thread start-up with torch's default pool; one thread is ~30× faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = pipeline.run()
    finally:
        torch.set_num_threads(threads)
    llm = report.llm_answers
    answers = f"; LLM answers: {llm.get('asked', 0)} asked, {llm.get('from_cache', 0)} from the cache" if llm else ""
    print(
        f"synth: {report.written} dialogues written ({report.attempted - report.written} dropped) to "
        f"{pipeline.output_dir}{answers}; report: {pipeline.output_dir / 'report.json'}"
    )
    if report.source_skips:
        print(f"synth: source rows skipped: {dict(sorted(report.source_skips.items()))} (examples in report.json)")
    return report
