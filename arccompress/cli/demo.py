"""`arccompress demo`: the whole pipeline on a tiny random checkpoint built on the spot, offline, in seconds."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on a tiny random checkpoint built on the spot")
    p.add_argument("--workdir", help="keep the tiny checkpoints in this folder (default: a temporary one, removed)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.workdir:
        return demo(Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="arccompress-demo-") as workdir:
        return demo(Path(workdir))


def demo(workdir: Path) -> int:
    from ..compressor import Compressor
    from ..console import quiet_loading
    from ..engines.transformers import Generator
    from ..prompts import fewshot_qa_prompt
    from ..tiny import build_tiny_pair

    print("arccompress demo: a tiny ARC-Encoder and decoder with RANDOM weights, built on the spot (no download).")
    print("Every step is the real pipeline; the generated text is noise because the weights are random (the tiny")
    print("decoder is arranged to pick letters, so that its noise shows as text).\n")
    with quiet_loading():
        encoder, decoder = build_tiny_pair(workdir)
    comp = Compressor.from_pretrained(encoder)
    print(f"encoder   {comp}")
    gen = Generator.from_pretrained(decoder, compressor=comp)
    print(f"decoder   {gen}\n")
    docs = [
        "The Loire is the longest river in France. It rises in the Massif Central and flows 1,006 km "
        "north and then west to the Atlantic Ocean at Saint-Nazaire.",
        "Mont Blanc, at 4,806 metres, is the highest mountain in the Alps and in Western Europe.",
    ]
    contexts = comp.compress(docs)
    for ctx in contexts:
        print(f"compress  {ctx.num_tokens:>4} tokens -> {ctx.num_embeddings:>3} embeddings "
              f"({ctx.compression_ratio:.1f}x)  {ctx.text[:48]!r}...")
    prompt = fewshot_qa_prompt("How long is the Loire?", contexts[0],
                               examples=[(contexts[1], "How high is Mont Blanc?", "4,806 metres")])
    s = gen.savings(prompt)
    print(f"\nprompt    few-shot QA, {s.num_contexts} compressed documents: {s.prompt_length} decoder positions "
          f"instead of {s.full_text_prompt_length} with the full text")
    answer = gen.generate(prompt, max_new_tokens=24, temperature=1.0, seed=0)
    print(f"generate  {answer!r}  (sampled, temperature 1, seed 0: random letters from random weights)")
    print("\nWith the released models: arccompress ask --encoder kyutai/ARC8_Encoder_Mistral "
          "--decoder mistralai/Mistral-7B-v0.3 --text ... --question ...")
    return 0
