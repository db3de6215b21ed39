"""The CPU demo (``make demo`` / ``python -m pretrain.demo``): the whole path on the shipped real text.

1. train an 8k-vocab sentencepiece BPE on the samples in ``data_tools/samples`` (Pile, C4, Wikipedia);
2. tokenize each sample into Megatron-format ``.bin/.idx`` and build the blended mix
   (``configs/data/demo_mix.yaml``, its outputs moved under ``runs/demo/data``);
3. pretrain ``hgrn2.preset("tiny")`` with ``configs/tiny-cpu.yaml`` (evaluation, TensorBoard logs in
   ``runs/demo/train/tensorboard``, checkpoints in ``runs/demo/train/checkpoints``);
4. convert the last checkpoint to the Hugging Face format of fla's ``HGRN2ForCausalLM``
   (``runs/demo/hf``, checked against fla) and print a short generated continuation.

Data steps are cached (a rerun skips them); training starts fresh each time. About 5–8 minutes on a
2-core CPU. Extra ``key=value`` arguments override the training config (e.g. ``run.steps=50``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = Path("runs/demo")
DATA_DIR = DEMO_DIR / "data"
TRAIN_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
MIX_SPEC = REPO / "configs" / "data" / "demo_mix.yaml"
VOCAB_SIZE = 8000
PROMPT = "The history of the city"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def demo_spec() -> Path:
    """The shipped demo mix spec with its outputs under runs/demo/data (raw inputs stay in the repo)."""
    spec = yaml.safe_load(MIX_SPEC.read_text())
    spec["output_dir"] = str(DATA_DIR / "mix")
    for source in spec["sources"]:
        source["path"] = str(DATA_DIR / Path(source["path"]).name)
        source["raw"] = [str(REPO / path) for path in source.get("raw", [])]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / "demo_mix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def prepare_data(spec_path: Path) -> tuple[Path, Path]:
    """Tokenizer, tokenized sources and the mix; returns (tokenizer .model, mix directory)."""
    from data_tools import preprocess, tokenizer
    from data_tools.mix import build_mix

    spec = yaml.safe_load(spec_path.read_text())
    prefix = DATA_DIR / "tokenizer"
    model = Path(f"{prefix}.model")
    if not model.is_file():
        args = ["--mix", str(spec_path), "--vocab-size", str(VOCAB_SIZE), "--output", str(prefix), "--threads", "2"]
        if tokenizer.main(args) != 0:
            raise RuntimeError("tokenizer training failed (see above)")
    for source in spec["sources"]:
        args = ["--input", *source["raw"], "--tokenizer", str(model), "--output-prefix", source["path"],
                "--workers", "2", "--no-progress"]
        if preprocess.main(args) != 0:
            raise RuntimeError(f"preprocessing {source['name']} failed (see above)")
    return model, build_mix(spec_path)


def pretrain(tokenizer: Path, mix_dir: Path, overrides: list[str]) -> tuple[dict, dict, Path]:
    """Train from scratch; returns (first evaluation, last evaluation, checkpoint save dir)."""
    from pretrain.config import load_config
    from pretrain.train import Trainer

    output = DEMO_DIR / "train"
    shutil.rmtree(output, ignore_errors=True)  # the demo always trains from scratch
    fixed = [f"data.mix_dir={mix_dir}", f"data.tokenizer={tokenizer}", f"run.output_dir={output}",
             "checkpoint.resume=none", "eval.at_start=true", "eval.at_end=true"]
    cfg = load_config(TRAIN_CONFIG, fixed + overrides)
    trainer = Trainer(cfg)
    trainer.run()
    return trainer.evaluations[0], trainer.evaluations[-1], cfg.checkpoint_dir


def export(checkpoints: Path) -> dict:
    from hgrn2.convert import to_hf

    out = DEMO_DIR / "hf"
    shutil.rmtree(out, ignore_errors=True)
    return to_hf(checkpoints, out)


def continuation(checkpoints: Path, tokenizer_path: Path) -> str:
    import hgrn2
    from data_tools.tokenizer import load_tokenizer
    from hgrn2.convert import resolve_checkpoint_dir

    model = hgrn2.load_checkpoint(resolve_checkpoint_dir(checkpoints))
    tokenizer = load_tokenizer(tokenizer_path)
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    out = model.generate(prompt, 40, temperature=0.8, top_k=40, eos_token_id=tokenizer.eos_id, seed=0)
    return tokenizer.decode(out[0, prompt.shape[1] :].tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    times = {}

    banner("1-2/4 tokenizer, preprocessing, mix")
    tick = time.perf_counter()
    tokenizer, mix_dir = prepare_data(demo_spec())
    times["data"] = time.perf_counter() - tick

    banner("3/4 pretraining the tiny model (configs/tiny-cpu.yaml)")
    tick = time.perf_counter()
    first, last, checkpoints = pretrain(tokenizer, mix_dir, args.overrides)
    times["train"] = time.perf_counter() - tick

    banner("4/4 Hugging Face export (checked against fla) and a sample")
    tick = time.perf_counter()
    report = export(checkpoints)
    times["export"] = time.perf_counter() - tick
    verification = report.get("verification", {})
    print(f"exported to {report['out_dir']}: fla check {verification.get('status')} "
          f"(max |logit diff| {verification.get('max_abs_logit_diff', float('nan')):.2e})")
    text = continuation(checkpoints, tokenizer)
    print(f"prompt: {PROMPT!r}\ncontinuation: {text!r}")

    banner("summary")
    print(f"validation perplexity: untrained {first['ppl']:.1f} (step {first['step']}) → "
          f"trained {last['ppl']:.1f} (step {last['step']})")
    print("wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items())
          + f"; total {time.perf_counter() - started:.0f} s")
    print(f"TensorBoard: tensorboard --logdir {DEMO_DIR / 'train' / 'tensorboard'}")
    if not last["ppl"] < first["ppl"] / 2:
        print("demo FAILED: training did not lower the validation perplexity enough", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
