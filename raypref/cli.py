"""The ``raypref`` command line: ``raypref <command> --help`` explains each option.

    raypref shapes-eval --generator checkpoint:shipped --out /tmp/eval     ShapesEval of a model or teacher
    raypref synpic [--preset P] [--config Y] [section.key=value ...]       Syn-Pic preference data
    raypref ospo   [--preset P] [--config Y] [section.key=value ...]       OSPO preference pairs
    raypref train  [--preset P] [--method M] [section.key=value ...]       DPO / RankDPO / BalancedDPO / SFT
    raypref evolve [--preset P] [--config Y] [section.key=value ...]       curate -> SFT -> prefs -> DPO rounds
    raypref serve  --images [--judge shapes] [--port 8000]                 the images API and/or the judge

synpic, ospo, train and evolve forward their arguments to the jobs' entry points in the package
(``raypref.synpic.main``, ``raypref.ospo.main``, ``raypref.train.main``, ``raypref.evolve.main``;
``jobs/*.py`` are the same entry points as scripts): ``raypref train --help`` is that job's help.
With RAY_ADDRESS set they run on that cluster; otherwise on a local Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _shapes_eval(args) -> int:
    from raypref.generators import build_generator
    from raypref.shapes.evaluate import format_table, rescore_dir, run_eval

    if args.rescore:  # an existing evaluation set, scored again from its images by the spec's rules
        if args.generator:
            raise ValueError("give --generator or --rescore DIR, not both")
        print(format_table({**rescore_dir(args.rescore), "generator": f"rescored {args.rescore}"}))
        return 0
    if not args.generator:
        raise ValueError("give --generator SPEC (or --rescore DIR)")

    kwargs = {}
    if args.generator.startswith("checkpoint:"):
        kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    gen = build_generator(args.generator, **kwargs)
    scores = run_eval(gen, args.n_per_category, args.seed, args.out, batch_size=args.batch_size)
    print(format_table(scores))
    if args.out:
        print(f"wrote {scores['n']} images, manifest.jsonl and scores.json to {args.out}")
    if hasattr(gen, "teacher"):
        print(f"teacher calls: {gen.teacher.calls}, cost: {gen.teacher.cost:g}")
    return 0


# subcommand -> (module whose main() is the job, one-line help); their options are the job's own parser's
FORWARD = {
    "synpic": ("raypref.synpic", "build (or resume) a Syn-Pic ranked preference dataset with Ray Data"),
    "ospo": ("raypref.ospo", "build OSPO preference pairs (or the naive baseline), optionally with rounds"),
    "train": ("raypref.train", "preference-train a model with Ray Train: dpo | rankdpo | balanced | sft"),
    "evolve": ("raypref.evolve", "self-evolving rounds: director curation, SFT, preferences, DPO, ShapesEval"),
}


def _prefs_convert(args) -> int:
    import json
    import logging
    import os

    import ray

    from raypref import pickapic

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's progress lines: its log file only
    print(f"raypref prefs convert: checking {args.input}, then grouping per caption with Ray Data", file=sys.stderr)
    print(json.dumps(pickapic.convert(args.input, args.output), indent=1))
    return 0


def _forward(command: str, argv: list[str]) -> int:
    module, _ = FORWARD[command]
    sys.argv[0] = f"raypref {command}"  # the job's argparse names itself after argv[0]
    importlib.import_module(module).main(argv)
    return 0


def _serve(args) -> int:
    import os
    import time

    import ray
    from ray import serve

    if not (args.images or args.judge):
        raise ValueError("nothing to serve: give --images and/or --judge BACKEND")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    apps = []
    if args.images:
        from raypref.serving.images import build_images_app

        serve.run(build_images_app(
            args.checkpoint, args.lora, num_cpus=args.num_cpus, num_replicas=1, max_n=args.max_n,
            steps=args.steps, guidance=args.guidance, api_key=os.environ.get(args.api_key_env) or None,
        ), name="images", route_prefix="/")
        apps.append("images")
        print(f"images API: http://{args.host}:{args.port}/v1/images/generations (checkpoint {args.checkpoint})")
    if args.judge:
        from raypref.judges import JudgeSection
        from raypref.serving.judge import build_judge_app

        section = JudgeSection(backend=args.judge, error_rate=args.judge_error_rate, model=args.judge_model,
                               base_url=args.judge_base_url)
        serve.run(build_judge_app(args.judge, section.kwargs(), num_cpus=args.num_cpus,
                                  autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                                  api_key=os.environ.get(args.api_key_env) or None),
                  name="judge", route_prefix="/judge")
        apps.append("judge")
        print(f"judge: POST http://{args.host}:{args.port}/judge/<discriminate|vqa|questions|expand|mutate>")
    if args.no_block:
        return 0
    print("serving; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for name in apps:
            serve.delete(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "shapes-eval",
        help="ShapesEval of a teacher or checkpoint; writes an evaluation set any tool can re-score",
        description="Generate a fixed ShapesEval prompt set (n per category, seeded), score it by the rules of "
        "shared/shapes_world.md and write DIR/images/*.png, DIR/manifest.jsonl and DIR/scores.json.",
    )
    p.add_argument(
        "--generator",
        help="teacher:NAME (clean, prism, quill, vellum, zephyr) or checkpoint:PATH "
        "(a diffusers pipeline dir, a Ray Train checkpoint dir, or 'shipped' for the packaged base model)",
    )
    p.add_argument("--n-per-category", type=int, default=50, help="prompts per category (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set and of the images (default 0)")
    p.add_argument("--out", help="output directory (omit to only print the table)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps for checkpoints (default 30)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance for checkpoints (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="images generated per call (default 64)")
    p.add_argument("--rescore", metavar="DIR", help="re-score an evaluation set written by --out (no generation)")
    p.set_defaults(func=_shapes_eval)

    for name, (job, text) in FORWARD.items():
        # placeholders for the top-level help: main() hands these commands' arguments to the job
        sub.add_parser(name, help=f"{text} ({job}.main; `raypref {name} --help` lists its options)",
                       add_help=False)

    p = sub.add_parser("prefs", help="preference data tools: `prefs convert` (Pick-a-Pic layout -> raypref's)")
    prefs = p.add_subparsers(dest="prefs_command", required=True)
    p = prefs.add_parser(
        "convert", help="Pick-a-Pic-layout Parquet or save_to_disk data -> raypref's layout",
        description="Check every row (file, row and column of a bad one named; nothing written), then write "
                    "raypref's layout grouped per caption: one K-image ranking row where a caption's pairs are "
                    "consistent (RankDPO can use it), else one row per pair; ties dropped.")
    p.add_argument("input", help="Pick-a-Pic Parquet file or directory, or a Dataset.save_to_disk directory")
    p.add_argument("output", help="a new directory for the Parquet files")
    p.set_defaults(func=_prefs_convert)

    p = sub.add_parser(
        "serve", help="serve the images API (OpenAI-compatible) and/or the judge on this machine",
        description="Start Ray Serve (on RAY_ADDRESS's cluster, or a local Ray) with the images app "
                    "(raypref/serving/images.py: POST /v1/images/generations) and/or the judge app "
                    "(raypref/serving/judge.py: POST /judge/<op>), bound to --host:--port, and block until Ctrl-C.",
    )
    p.add_argument("--images", action="store_true", help="serve the image model (OpenAI images API at /v1)")
    p.add_argument("--checkpoint", default="shipped",
                   help="images: 'shipped', a diffusers pipeline dir or a Ray Train checkpoint (default shipped)")
    p.add_argument("--lora", help="images: a LoRA dir (or a checkpoint holding lora/) applied to --checkpoint")
    p.add_argument("--steps", type=int, default=30, help="images: sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=3.0, help="images: classifier-free guidance (default 3)")
    p.add_argument("--max-n", type=int, default=4, help="images: most images per request (default 4)")
    p.add_argument("--api-key-env", default="RAYPREF_API_KEY",
                   help="environment variable holding the bearer token both apps require (unset or empty: no auth)")
    p.add_argument("--judge", metavar="BACKEND", help="serve the judge too: shapes | openai | transformers")
    p.add_argument("--judge-error-rate", type=float, default=0.0, help="judge (shapes): simulated error rate")
    p.add_argument("--judge-model", default="", help="judge (openai: served model name; transformers: model path)")
    p.add_argument("--judge-base-url", default="", help="judge (openai): the VLM endpoint, e.g. http://vllm:8000/v1")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--ray-cpus", type=float, default=None, help="logical CPUs of a local Ray (default: all cores)")
    p.add_argument("--no-block", action="store_true", help="return after deploying (the apps keep running "
                                                           "while this process's Ray does)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARD:
        try:
            return _forward(argv[0], argv[1:])
        except ValueError as e:  # bad config: a clear message, no traceback
            print(f"raypref {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"raypref {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
