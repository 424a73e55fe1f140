"""`vgdistill ablate`: the paper's ablation tables from one command, resumable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vgdistill.cli.common import SetOption, State, console, err_console, friendly, out_option


def _factor_option(option: str, what: str) -> Any:
    return typer.Option(option, help=f"Comma list of values to try: {what}.", show_default=False)


@friendly
def command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe (a shipped name or a TOML file): the baseline row.")
    ],
    distill_pos: Annotated[
        str | None, _factor_option("--distill-pos", "fusion, linear, backbone, cnn")
    ] = None,
    loss: Annotated[str | None, _factor_option("--loss", "cosine, l1, mse")] = None,
    modality: Annotated[str | None, _factor_option("--modality", "both, image, text, none")] = None,
    teacher: Annotated[str | None, _factor_option("--teacher", "frozen, trainable")] = None,
    alpha: Annotated[
        str | None, _factor_option("--alpha", "image distillation weights, e.g. 0.5,1.5")
    ] = None,
    beta: Annotated[
        str | None, _factor_option("--beta", "text distillation weights, e.g. 1,2")
    ] = None,
    teacher_view: Annotated[
        str | None,
        _factor_option("--teacher-view", "padded, image (what the teacher's image shows)"),
    ] = None,
    overrides: SetOption = None,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid/--one-at-a-time",
            help="Run every combination, or (default) change one factor at a time around the "
            "recipe's values, as paper tables do.",
        ),
    ] = False,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", min=1, help="Runs per variant (seeds recipe, +1, ...): mean ± std."
        ),
    ] = 1,
    out: Annotated[
        Path | None,
        out_option("Ablation folder. Default: runs/ablate-NAME, NAME being the recipe name."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the variants and their run folders; run none.")
    ] = False,
    launch: Annotated[
        str | None,
        typer.Option(
            "--launch",
            help="Start each run's train and eval with this command line instead of python, "
            "e.g. 'accelerate launch --num_processes 8' (it is followed by -m vgdistill ...).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: run only every N-th run, starting at the I-th (1-based), so N ablate "
            "processes with the same options share the work (one per GPU, see below).",
        ),
    ] = None,
) -> None:
    """Train and evaluate variants of a recipe; tabulate Acc@0.5 against the baseline.

    Each variant (x seed) is a normal run folder under --out, trained by `vgdistill train`
    and scored by `vgdistill eval` in its own process (output: ablate.log in that folder).

    Re-running the same command skips finished variants and resumes a cut-off one.

    Writes summary.csv, summary.json and summary.md (a paper-style table) into --out.

    Example: vgdistill ablate refcoco/r50 --modality both,image,text,none --loss cosine,l1

    Several GPUs, one run at a time: --launch "accelerate launch --num_processes 8" trains and
    evaluates each run on all eight.

    Several GPUs, runs side by side: start one ablate per GPU, in the background, with the
    same options plus --shard I/N: CUDA_VISIBLE_DEVICES=0 vgdistill ablate ... --shard 1/4 &,
    CUDA_VISIBLE_DEVICES=1 vgdistill ablate ... --shard 2/4 &, and so on; once all have ended,
    the same command without --shard prints the whole table (finished runs are skipped).

    With two GPUs per shard, give each launcher its own port: CUDA_VISIBLE_DEVICES=0,1 ...
    --shard 1/2 --launch "accelerate launch --num_processes 2 --main_process_port 29501".
    """
    from vgdistill.recipe import load_recipe
    from vgdistill.recipe.shipped import run_name
    from vgdistill.tools.ablate.plan import FACTORS, check_variants, idle_changes, plan
    from vgdistill.tools.ablate.runner import launcher, parse_shard

    given = {
        "position": distill_pos,
        "loss": loss,
        "modality": modality,
        "teacher": teacher,
        "alpha": alpha,
        "beta": beta,
        "view": teacher_view,
    }
    factors = {k: FACTORS[k].parse(v) for k, v in given.items() if v is not None}
    sets = list(overrides or [])
    base = load_recipe(recipe, sets)
    out = out or Path("runs") / f"ablate-{run_name(recipe)}"
    launch_words, share = launcher(launch), parse_shard(shard)
    variants = plan(base, factors, grid=grid, seeds=seeds, out=out)
    check_variants(recipe, sets, variants)
    for variant in variants:
        idle = idle_changes(variant, base)
        if idle:
            modality = variant.changes.get("distill.modality", base.distill.modality)
            err_console.print(
                f"warning: variant {variant.name}: {', '.join(idle)} has no effect with "
                f"distill.modality = {modality}; this variant will repeat another",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    if dry_run:
        from vgdistill.report.tables import ablation_plan_table

        console.print(ablation_plan_table(variants, grid))
        return
    _run(recipe, sets, variants, out, base.eval.splits, grid, seeds, launch_words, share)


def _say(text: str, err: bool = False) -> None:
    """One plain line per event: no markup, never wrapped (paths stay copyable)."""
    (err_console if err else console).print(text, highlight=False, markup=False, soft_wrap=True)


def _reporter(
    recipe: Path, sets: list[str], splits: list[str], total: int, seeds: int
) -> Callable[[str, Any, Any, Any], None]:
    """The `run_all` callback that prints a line as each run starts and ends."""
    from vgdistill.tools.ablate.plan import recipe_drift

    counter = {"i": 0}

    def on_event(kind: str, variant: Any, run: Any, outcome: Any) -> None:
        label = variant.name + (f" seed {run.seed}" if seeds > 1 else "")
        if kind == "start":
            counter["i"] += 1
        prefix = f"[{counter['i']}/{total}] {label}:"
        if kind == "start":
            status = run.status()
            if status != "done":
                how = "resuming" if status == "partial" else "training"
                _say(f"{prefix} {how} in {run.dir} (log: {run.log})")
        elif outcome.status == "skipped":
            _say(f"{prefix} finished earlier, skipped")
            drift = recipe_drift(run.dir, recipe, [*sets, *variant.overrides(run)])
            if drift:
                keys = ", ".join(drift[:4]) + (" ..." if len(drift) > 4 else "")
                _say(
                    f"  warning: its recipe.toml differs from this command in {keys}; its "
                    f"results are kept (delete {run.dir} to run it again)",
                    err=True,
                )
        elif outcome.status == "done":
            results = run.results() or {}
            scores = "  ".join(
                f"{s} {100 * results[s]['acc50']:.2f}" for s in splits if s in results
            )
            _say(f"{prefix} done in {_duration(outcome.seconds)}; Acc@0.5 {scores}")
        else:
            _say(
                f"{prefix} FAILED after {_duration(outcome.seconds)}: {outcome.error} "
                f"(log: {run.log})",
                err=True,
            )

    return on_event


def _run(
    recipe: Path,
    sets: list[str],
    variants: list,
    out: Path,
    splits: list[str],
    grid: bool,
    seeds: int,
    launch: list[str],
    shard: tuple[int, int] | None,
) -> None:
    from vgdistill.atomic import exclusive
    from vgdistill.report.tables import ablation_table
    from vgdistill.tools.ablate.runner import Interrupted, run_all, shard_runs
    from vgdistill.tools.ablate.summary import summarise, write_summary

    total = len(shard_runs(variants, shard))
    on_event = _reporter(recipe, sets, splits, total, seeds)
    meta = {
        "recipe": str(recipe),
        "overrides": sets,
        "mode": "grid" if grid else "one-at-a-time",
        "seeds": seeds,
        "out": str(out),
        "launch": launch,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
    }
    outcomes: dict = {}
    interrupted = False
    # Shards of one ablation share --out; each shard (and an unsharded run) has its own lock.
    lock = out / f"shard-{shard[0]}-of-{shard[1]}" if shard else out
    with exclusive(lock, "another `vgdistill ablate`"):
        try:
            run_all(
                recipe,
                sets,
                variants,
                outcomes,
                on_event=on_event,
                verbose=State.verbose,
                launch=launch,
                shard=shard,
            )
        except Interrupted:
            interrupted = True
        summary = summarise(variants, splits, outcomes, meta)
        paths = write_summary(out, summary)
    console.print(ablation_table(summary, title=f"Ablation: {recipe} ({meta['mode']})"))
    console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False)
    if shard:
        _say(
            f"shard {shard[0]}/{shard[1]}: other shards' runs show as unfinished until they end; "
            "the same command without --shard then prints the whole table"
        )
    if interrupted:
        err_console.print(
            "interrupted; the running variant saved a resumable state. Re-run the same "
            "command to continue (finished variants are skipped)."
        )
        raise typer.Exit(130)
    failed = [r for r in summary["variants"] if r["status"] == "failed"]
    if failed:
        err_console.print(
            f"[red]{len(failed)} of {len(variants)} variants failed[/]: "
            + ", ".join(r["name"] for r in failed)
            + "; see their ablate.log. Re-running retries them.",
            highlight=False,
        )
        raise typer.Exit(1)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
