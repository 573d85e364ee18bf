"""Make the fixed text of bench/fp4_quality.py: calibration and held-out sets, written once and committed.

No corpus can be downloaded here, so (bench/data/fp4_quality/README.md says the same):

- SmolLM2-135M-Instruct, calibration: its own sampled answers (chat template, temperature 0.8, seed
  CALIB_SEED) to SMOL_PROMPTS; only the answer text is kept.
- SmolLM2-135M-Instruct, held-out: human-written English prose, the paragraphs (HTML <p>, code blocks
  left out, inline code kept as text) of "The Rust Programming Language" from chapter 3 on, in page order,
  as shipped with the local Rust toolchain's documentation (MIT OR Apache-2.0), up to SMOL_HELDOUT_TOKENS
  tokens (chapters 3 and 4 fill it).
- TinyStories-656K, calibration and held-out: stories the model itself samples (temperature 1.0, no
  truncation of the distribution), from two disjoint lists of story openings and two different seeds.
  The model only knows children's stories, so no human text on this machine would be a fair test of it.

Each file is JSON lines, one {"text": ...} per document; manifest.json records how each was made and its
sha256. Run once (about a minute):

    python bench/fp4_quality_data.py [--rust-book DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actserve.server.models.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "fp4_quality"
TINY = ROOT / "tests" / "data" / "tinystories-656k"
RUST_BOOK = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book"
RUST_CHAPTERS = tuple(f"ch{n:02d}-" for n in range(3, 11))  # ch03 .. ch10, in file-name order
CALIB_SEED, HELDOUT_SEED = 1234, 5678
SMOL_HELDOUT_TOKENS = 12800  # a little over the 24 windows of 512 tokens the bench scores
SMOL_PROMPTS = (
    "Explain how a bicycle stays upright while it moves.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the seasons on Earth?",
    "Describe how bread is made, from flour to the finished loaf.",
    "Give me some advice for preparing for a job interview.",
    "Summarize the history of the printing press in a few paragraphs.",
    "How do vaccines help the immune system?",
    "Write a letter to a friend describing a trip to the mountains.",
    "What is the difference between weather and climate?",
    "Explain what a database index is and why it makes queries faster.",
    "Describe the life cycle of a butterfly.",
    "What should I consider when adopting a dog?",
    "Write a short essay about the importance of public libraries.",
    "How does a refrigerator keep food cold?",
    "Explain the rules of chess to a beginner.",
    "Describe a busy market in a small town on a Saturday morning.",
)
TINY_CALIB_OPENINGS = ("Once upon a time", "One day, a little girl named Lily", "Tom had a red ball")
TINY_HELDOUT_OPENINGS = (
    "Once upon a time, in a big forest,",
    "One sunny morning, a boy named Ben",
    "There was a little dog called Max",
    "Sara and her mom went to the park",
)
TINY_CALIB_PER_OPENING, TINY_HELDOUT_PER_OPENING = 16, 30


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def smol_answers(model: Any, tok: Any, seed: int) -> list[str]:
    """One sampled answer per prompt (batched, left padding)."""
    tok.padding_side = "left"
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in SMOL_PROMPTS
    ]
    batch = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(
        **batch, do_sample=True, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=320, pad_token_id=2
    )
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def rust_book_paragraphs(book: Path, tok: Any, budget: int) -> list[str]:
    """One document per chapter file (its <p> paragraphs joined by blank lines), until `budget` tokens."""
    docs: list[str] = []
    used = 0
    for page in sorted(p for p in book.glob("ch*.html") if p.name.startswith(RUST_CHAPTERS)):
        main = page.read_text(encoding="utf-8").split("<main>", 1)[-1].split("</main>", 1)[0]
        paras = []
        for raw in re.findall(r"<p>(.*?)</p>", main, re.S):
            text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())
            if len(text.split()) < 8:  # captions ("Filename: src/main.rs"), stray fragments
                continue
            n = len(tok(text + "\n\n").input_ids)
            if used + n > budget:
                break
            paras.append(text)
            used += n
        if paras:
            docs.append("\n\n".join(paras))
        if used + 64 > budget:
            break
    return docs


def tiny_stories(model: Any, tok: Any, openings: tuple[str, ...], per: int, seed: int) -> list[str]:
    torch.manual_seed(seed)
    stories = []
    for opening in openings:
        ids = tok(opening, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=400,
            num_return_sequences=per,
            eos_token_id=2,
            pad_token_id=0,
        )
        texts = tok.batch_decode(out, skip_special_tokens=True)
        stories += [t.split(tok.eos_token, 1)[0].strip() for t in texts]  # decode keeps <|end_story|>
    return stories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rust-book", type=Path, default=RUST_BOOK)
    args = ap.parse_args()
    torch.set_num_threads(2)
    DATA.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    smol_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(smol_dir)
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
        write_jsonl(DATA / "smollm2_calib.jsonl", smol_answers(model, tok, CALIB_SEED))
        files["smollm2_calib.jsonl"] = {
            "made_by": f"SmolLM2-135M-Instruct answers to {len(SMOL_PROMPTS)} fixed prompts, chat template, "
            f"temperature 0.8, max 320 new tokens, seed {CALIB_SEED}",
        }
        write_jsonl(
            DATA / "smollm2_heldout.jsonl", rust_book_paragraphs(args.rust_book, tok, SMOL_HELDOUT_TOKENS)
        )
        files["smollm2_heldout.jsonl"] = {
            "made_by": "human-written: <p> paragraphs of The Rust Programming Language from chapter 3 on, "
            f"in page order, up to {SMOL_HELDOUT_TOKENS} tokens (Rust toolchain docs, "
            "share/doc/rust/html/book; MIT OR Apache-2.0), one document per page",
        }
        tiny_tok = AutoTokenizer.from_pretrained(TINY)
        tiny = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
        for name, openings, per, seed in (
            ("tinystories_calib.jsonl", TINY_CALIB_OPENINGS, TINY_CALIB_PER_OPENING, CALIB_SEED),
            ("tinystories_heldout.jsonl", TINY_HELDOUT_OPENINGS, TINY_HELDOUT_PER_OPENING, HELDOUT_SEED),
        ):
            write_jsonl(DATA / name, tiny_stories(tiny, tiny_tok, openings, per, seed))
            files[name] = {
                "made_by": f"TinyStories-656K samples, {per} per opening of {list(openings)}, "
                f"temperature 1.0, "
                f"max 400 new tokens, seed {seed}",
            }
    for name, info in files.items():
        info["sha256"] = sha256(DATA / name)
        info["documents"] = len((DATA / name).read_text().splitlines())
    manifest = {
        "command": shlex.join(["python", "bench/fp4_quality_data.py", *sys.argv[1:]]),
        "split": {
            "smollm2": {"calibration": "smollm2_calib.jsonl", "heldout": "smollm2_heldout.jsonl"},
            "tinystories": {"calibration": "tinystories_calib.jsonl", "heldout": "tinystories_heldout.jsonl"},
        },
        "files": files,
    }
    (DATA / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, info in files.items():
        print(f"{name:<28} {info['documents']:>4} docs  {info['sha256'][:16]}")


if __name__ == "__main__":
    main()
