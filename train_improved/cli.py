"""Command-line entry points: `train` and `generate-resume-command`.

Commands are thin: they gather options and call the package. Domain errors (bad options, bad
data, bad checkpoints) become one red line on stderr and exit code 1, here and only here.
Heavy imports (torch) happen inside the commands, so `--help` and `--list-checkpoints` stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from . import config
from .checkpoint import CheckpointError
from .config import ConfigError, DataError, TrainConfig
from .progress import configure_logging, err_console

_D = TrainConfig()
# `train --help` in groups, in the order a user reads them.
_PANELS = {
    "Your model (a task)": ["task", "num-workers"],
    "Model": ["n-layer", "n-head", "n-embd", "block-size", "dropout", "vocab-size"],
    "Data": ["data"],
    "Optimization": ["batch-size", "mini-batch-size", "lr", "min-lr", "warmup-steps", "weight-decay", "grad-clip",
                     "num-epochs", "max-steps", "seed", "device", "dtype", "compile", "fsdp"],
    "Evaluation and best model": ["eval-interval", "eval-steps", "metric", "mode", "keep-best", "sample-length"],
    "Checkpoints": ["checkpoint-dir", "checkpoint-freq", "keep-checkpoints", "keep-emergency-checkpoints",
                    "min-free-space", "async-save", "mtbf", "emergency-budget"],
    "Mirror (a second tier)": ["mirror", "mirror-options"],
    "Logging": ["log-dir", "log-interval", "metrics-file", "use-tensorboard"],
}
_PANEL_OF = {name: panel for panel, names in _PANELS.items() for name in names}
_DURATIONS = {"mtbf", "emergency_budget", "log_interval"}


def _shown(field: str, value: Any) -> str | None:
    """A default as users write it: 24h, not 86400.0; --no-compile, not False."""
    if value is None:
        return None
    if field == "mini_batch_size":
        return "--batch-size (no accumulation)"
    if field in _DURATIONS:
        return config.format_duration(value)
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{field.replace('_', '-')}"
    return str(value)


def _opt(name: str, help: str, **kw: Any) -> Any:
    """An option whose absence is None, so that lower-precedence sources can fill it in; its default is shown
    in the help as `[default: 4]`, and it sits in its panel."""
    field = name.split("/")[0].replace("-", "_")
    shown = _shown(field, getattr(_D, field, None))
    text = help + (f" [dim]\\[default: {escape(shown)}][/dim]" if shown is not None else "")
    return typer.Option(f"--{name}", help=text, show_default=False,
                        rich_help_panel=_PANEL_OF.get(name.split("/")[0], "Options"), **kw)


Int = Optional[int]
Float = Optional[float]
Str = Optional[str]
Bool = Optional[bool]


def _print_version(shown: bool) -> None:
    if shown:
        from . import __version__

        print(f"train_improved {__version__}")
        raise typer.Exit(0)


def train(
    ctx: typer.Context,
    task: Annotated[Str, _opt("task", "Train your own model: a task file (my_task.py) or module (pkg.task) with "
                                      "model(), datasets() and loss(); its own options follow on the command line "
                                      "(train --task FILE --help lists them). Default: the built-in GPT.")] = None,
    num_workers: Annotated[Int, _opt("num-workers", "DataLoader worker processes reading the samples (0: read in "
                                                    "the training loop). Default: 2 with --task, 0 for the "
                                                    "built-in GPT.")] = None,
    data: Annotated[Str, _opt("data", "Text file, directory of .txt, or directory of .npy/.bin token shards. "
                                      "Default: a corpus built from the Python standard library's sources.")] = None,
    vocab_size: Annotated[Int, _opt("vocab-size", "Vocabulary size (default: 256 for text, from the shards otherwise).")] = None,
    n_layer: Annotated[Int, _opt("n-layer", "Transformer blocks.")] = None,
    n_head: Annotated[Int, _opt("n-head", "Attention heads (must divide --n-embd).")] = None,
    n_embd: Annotated[Int, _opt("n-embd", "Embedding width.")] = None,
    block_size: Annotated[Int, _opt("block-size", "Context length in tokens.")] = None,
    dropout: Annotated[Float, _opt("dropout", "Dropout probability.")] = None,
    batch_size: Annotated[Int, _opt("batch-size", "Sequences per optimizer step.")] = None,
    mini_batch_size: Annotated[Int, _opt("mini-batch-size", "Sequences per forward/backward (gradient accumulation).")] = None,
    lr: Annotated[Float, _opt("lr", "Peak learning rate (after warmup).")] = None,
    min_lr: Annotated[Float, _opt("min-lr", "Learning rate at the end of the cosine decay (default: --lr / 10).")] = None,
    warmup_steps: Annotated[Int, _opt("warmup-steps", "Linear warmup steps.")] = None,
    weight_decay: Annotated[Float, _opt("weight-decay", "AdamW weight decay (matrices only).")] = None,
    grad_clip: Annotated[Float, _opt("grad-clip", "Clip the global gradient norm (0 disables).")] = None,
    num_epochs: Annotated[Int, _opt("num-epochs", "Passes over the training split.")] = None,
    max_steps: Annotated[Int, _opt("max-steps", "Stop after this optimizer step, even mid-epoch.")] = None,
    eval_interval: Annotated[Int, _opt("eval-interval", "Steps between evaluations.")] = None,
    eval_steps: Annotated[Int, _opt("eval-steps", "Held-out batches per evaluation.")] = None,
    seed: Annotated[Int, _opt("seed", "Random seed: the same command twice gives identical losses on CPU.")] = None,
    device: Annotated[Str, _opt("device", "auto, cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[Str, _opt("dtype", "float32, bfloat16 or float16 (autocast).")] = None,
    compile: Annotated[Bool, _opt("compile/--no-compile", "torch.compile the model.")] = None,
    fsdp: Annotated[Bool, _opt("fsdp/--no-fsdp", "Under torchrun: shard model and optimizer state (FSDP2); "
                                                "checkpoints become directories (torch.distributed.checkpoint).")] = None,
    checkpoint_dir: Annotated[Str, _opt("checkpoint-dir", "Checkpoint directory (env CHECKPOINT_DIR).")] = None,
    checkpoint_freq: Annotated[Str, _opt("checkpoint-freq", "Steps between rolling checkpoints, or 'auto' "
                                                            "(env CHECKPOINT_FREQ).")] = None,
    keep_checkpoints: Annotated[Int, _opt("keep-checkpoints", "Rolling checkpoints to keep (env CHECKPOINT_KEEP_LAST).")] = None,
    keep_emergency_checkpoints: Annotated[Int, _opt("keep-emergency-checkpoints", "Emergency checkpoints to keep.")] = None,
    metric: Annotated[Str, _opt("metric", "Metric that decides best_model.pt: val_loss, train_loss, or one "
                                          "a --task's metrics() reports (e.g. accuracy).")] = None,
    mode: Annotated[Str, _opt("mode", "min or max: which direction of --metric is better.")] = None,
    keep_best: Annotated[Int, _opt("keep-best", "Also keep the K best evaluations by --metric as "
                                                "best_step_NNNNNN.pt (0: only the best triple).")] = None,
    min_free_space: Annotated[Str, _opt("min-free-space", "Skip a save rather than leave less free disk than "
                                                          "this (e.g. 10GB, 500MiB).")] = None,
    async_save: Annotated[Bool, _opt("async-save/--no-async-save", "Write checkpoints in the background.")] = None,
    mtbf: Annotated[Str, _opt("mtbf", "Expected time between failures for --checkpoint-freq auto (e.g. 24h).")] = None,
    emergency_budget: Annotated[Str, _opt("emergency-budget", "Seconds an emergency save may take before it "
                                                              "skips its read-back check (e.g. 25s).")] = None,
    mirror: Annotated[Str, _opt("mirror", "Mirror every checkpoint to this fsspec URL (s3://bucket/run, gs://..., "
                                          "file:///mnt/nfs/run; env CHECKPOINT_MIRROR).")] = None,
    mirror_options: Annotated[Str, _opt("mirror-options", "JSON storage options for --mirror, e.g. "
                                                          "'{\"endpoint_url\": \"http://...\"}' (env "
                                                          "CHECKPOINT_MIRROR_OPTIONS; never stored).")] = None,
    log_dir: Annotated[Str, _opt("log-dir", "Directory for metrics.jsonl and TensorBoard files.")] = None,
    log_interval: Annotated[Str, _opt("log-interval", "Seconds between progress lines when stderr is not a "
                                                      "terminal, e.g. in a batch job's log (e.g. 60s, 5m).")] = None,
    metrics_file: Annotated[Str, _opt("metrics-file", "JSON-lines metrics file (default <log-dir>/metrics.jsonl).")] = None,
    use_tensorboard: Annotated[Bool, _opt("use-tensorboard/--no-use-tensorboard", "Also write TensorBoard event files to --log-dir.")] = None,
    sample_length: Annotated[Int, _opt("sample-length", "Length of the sample from the best model at the end (bytes of text for the built-in GPT; "
                         "passed to a task's sample()); 0: none.")] = None,
    resume: Annotated[Str, typer.Option("--resume", rich_help_panel="Resume", help="latest, best, auto (resume if possible, else start "
                                                         "fresh), a file name in --checkpoint-dir, or a path.")] = None,
    init_from: Annotated[Str, typer.Option("--init-from", rich_help_panel="Resume", help="Start a new run from this checkpoint's weights "
                                                               "(fine-tuning): new optimizer, schedule and step count.")] = None,
    config_file: Annotated[Str, typer.Option("--config", rich_help_panel="Resume", help="TOML file of options (below env and command line).")] = None,
    list_checkpoints: Annotated[bool, typer.Option("--list-checkpoints", rich_help_panel="Operator tools", help="List the checkpoint directory and exit.")] = False,
    json_output: Annotated[bool, typer.Option("--json", rich_help_panel="Operator tools", help="With --list-checkpoints: print JSON.")] = False,
    export: Annotated[Str, typer.Option("--export", rich_help_panel="Weights out", help="Export this checkpoint's "
                                        "model weights (latest, best, a name, a path, a sharded directory, or a "
                                        "mirror's URL/name) to --to, and exit.")] = None,
    to: Annotated[Str, typer.Option("--to", rich_help_panel="Weights out", help="With --export: the safetensors "
                                    "file (or, with --format hf, the directory) to write.")] = None,
    export_format: Annotated[str, typer.Option("--format", rich_help_panel="Weights out", help="With --export: "
                                               "safetensors, or hf (a transformers GPT-2 directory).")] = "safetensors",
    force: Annotated[bool, typer.Option("--force", rich_help_panel="Weights out",
                                        help="With --export: replace --to if it exists.")] = False,
    sample: Annotated[Str, typer.Option("--sample", rich_help_panel="Weights out", help="Print text sampled from "
                                        "this checkpoint's model (--prompt, --sample-length, --temperature, "
                                        "--seed), and exit.")] = None,
    prompt: Annotated[Str, typer.Option("--prompt", rich_help_panel="Weights out",
                                        help="With --sample: the text to continue (default: a line start).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", rich_help_panel="Weights out",
                                               help="With --sample: sampling temperature.")] = 0.8,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=lambda shown: _print_version(shown))] = False,
    verify: Annotated[bool, typer.Option("--verify", rich_help_panel="Operator tools", help="With --list-checkpoints: re-check every checksum.")] = False,
) -> None:
    """Train a GPT on the built-in corpus or your data, checkpointing so that no training is lost.

    Run with no options for the demo: a small model on the Python standard library's sources,
    a few minutes on a laptop CPU.
    """
    given = {k: v for k, v in locals().items() if k in config.OPTION_NAMES and v is not None}
    configure_logging()
    try:
        if ctx.args:  # options train does not know: the task's own (checked against its Options when it loads)
            if not (task or resume or config_file):
                raise ConfigError(f"no such option: {ctx.args[0]} (a task's own options need --task)")
            from .task import parse_extra_args

            given["task_options"] = parse_extra_args(ctx.args)
        if list_checkpoints:
            from .listing import list_checkpoints as show

            listed = config.resolve(cli=given, environ=os.environ, config_file=config_file, check=False)
            if mirror:  # the remote side alone, from its manifest
                from .listing import list_mirror

                raise typer.Exit(list_mirror(listed.mirror, listed.mirror_storage_options(), as_json=json_output,
                                             verify=verify))
            raise typer.Exit(show(Path(listed.checkpoint_dir), as_json=json_output, verify=verify,
                                  mirror_options=listed.mirror_storage_options()))
        if export is not None or sample is not None:
            from . import export as weights_out

            listed = config.resolve(cli=given, environ=os.environ, config_file=config_file, check=False)
            where = dict(directory=Path(listed.checkpoint_dir), mirror=listed.mirror,
                         mirror_options=listed.mirror_storage_options())
            if export is not None:
                if to is None:
                    raise ConfigError("--export needs --to: the file (or directory, with --format hf) to write")
                err_console.print(weights_out.export(export, Path(to), fmt=export_format, force=force,
                                                     dtype=given.get("dtype", "float32"), **where),
                                  highlight=False, soft_wrap=True)
            else:
                assert sample is not None
                print(weights_out.sample(sample, prompt="\n" if prompt is None else prompt,
                                         length=listed.sample_length, temperature=temperature, seed=listed.seed,
                                         **where))
            raise typer.Exit(0)
        from .session import run_session

        raise typer.Exit(run_session(given, resume=resume, config_file=config_file, init_from=init_from))
    except (ConfigError, DataError, CheckpointError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def generate_resume_command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file (a path, or a name inside --checkpoint-dir).")],
    ctx: typer.Context,
    compare: Annotated[bool, typer.Option("--compare", help="Show old vs new values and classify each change.")] = False,
) -> None:
    """Print the full `train` command that resumes from CHECKPOINT, every original option spelled out.

    Extra `--OPTION VALUE` pairs are proposed changes: with --compare, a table shows each old and new
    value and whether the change is harmless, changes the trajectory, or is incompatible (exit 1).
    """
    from .resume_command import main

    configure_logging()
    try:
        raise typer.Exit(main(checkpoint, ctx.args, compare=compare))
    except (ConfigError, CheckpointError) as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _normalize_argv(argv: list[str]) -> list[str]:
    """Accept the underscore spellings of older docs (--checkpoint_freq) as aliases of --checkpoint-freq."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def train_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train)
    return app


def main() -> None:
    argv = _normalize_argv(sys.argv[1:])
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--task"),
                next((a.split("=", 1)[1] for a in argv if a.startswith("--task=")), None))
    if spec is None or "--help" not in argv:
        train_app()(args=argv, prog_name="train")
        return
    try:
        train_app()(args=argv, prog_name="train")
    finally:
        _print_task_options(spec)


def _print_task_options(spec: str) -> None:
    """After `train --task X --help`: the task's own options, as a panel like train's."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from .task import TaskError, load_task, option_fields

    try:
        task = load_task(spec)
    except TaskError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return
    table = Table.grid(padding=(0, 2))
    for f in option_fields(task):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default).__name__ if default is not None else "str"
        table.add_row(f"[bold cyan]--{f.name.replace('_', '-')}[/]", f"[yellow]{kind.upper()}[/]",
                      f"[dim]\\[default: {escape(str(default))}][/dim]")
    doc = (task.module.__doc__ or "").strip().splitlines()
    title = f"Options of task {task.name}" + (f": {doc[0]}" if doc else "")
    Console().print(Panel(table if table.row_count else "(none)", title=title, title_align="left",
                          border_style="dim"))


def resume_command_main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(generate_resume_command)
    app(args=_normalize_argv(sys.argv[1:]), prog_name="generate-resume-command")
