"""Does a happy-minus-sad vector trained here make TinyStories-656K's stories sadder? (issue 4)

Trains on 24 hand-written happy/sad pairs (below; no downloaded data), picks the steering strength on
20 tuning prompts, then generates greedily from 50 held-out story openings (used nowhere else) with no
steering, with the vector at scale 0, at the sadder sign (negative scale of happy - sad), and at the
happier sign as a control. Each story is scored by fixed word lists: score = #sad words - #happy words
in the generated text; "types" is the same with each word counted once per story (so a loop such as
"cried cried cried" cannot inflate it); "up"/"down" are the shares of prompts whose score rose/fell
against the unsteered story, "p" a two-sided sign test on them, "same" the stories identical to it.

Strength: |scale * d| as a fraction of the mean residual norm at the steered layer (so methods whose
directions have different norms, mean_diff vs unit pca_diff, are swept on one axis). The chosen strength
is the one with the highest mean score on the tuning prompts among those whose stories stay fluent: mean
per-token NLL of the continuation under the unsteered model (transformers) at most MAX_NLL_RISE nats
above the unsteered stories', and a share of distinct word bigrams at least MIN_DISTINCT_RATIO of
theirs (steering too hard makes the model loop: "hurt hurt hurt ...", which NLL alone lets through).

    python bench/steering_happy_sad.py [--model DIR] [--max-tokens 48]
Writes bench/results/steering_happy_sad.json and prints the tables last. CPU float32, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from actserve.interventions.steering.hidden import Position, collect_residuals
from actserve.interventions.steering.train import Method, TrainedVector, train_vector
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "tests" / "data" / "tinystories-656k"
OUT = ROOT / "bench" / "results" / "steering_happy_sad.json"

PAIRS: list[tuple[str, str]] = [
    ("Lily got a new doll for her birthday. She was so happy and smiled all day.",
     "Lily lost her doll on her birthday. She was so sad and cried all day."),
    ("Tom played with his friends in the park. They laughed and had lots of fun.",
     "Tom sat alone in the park. Nobody wanted to play with him and he felt sad."),
    ("The sun was shining and the birds were singing. Sue felt happy and danced.",
     "The sky was dark and the rain would not stop. Sue felt sad and cried."),
    ("Ben found his lost puppy under the tree. He hugged the puppy and laughed.",
     "Ben could not find his lost puppy anywhere. He sat down and cried."),
    ("Mom gave Anna a big red balloon. Anna smiled and said, \"Thank you, Mom!\"",
     "Anna's red balloon flew away into the sky. Anna was sad and started to cry."),
    ("Max built a tall tower with his blocks. He was proud and happy.",
     "Max's tall tower fell down and broke. He was sad and upset."),
    ("The little bird learned to fly. It sang a happy song in the sky.",
     "The little bird hurt its wing and could not fly. It was sad and alone."),
    ("Mia and her dad baked a yummy cake. They ate it together and laughed.",
     "Mia dropped the cake on the floor. It was ruined and she cried."),
    ("Sam's grandma came to visit. Sam was very happy and gave her a big hug.",
     "Sam's grandma had to go away. Sam was very sad and missed her a lot."),
    ("The kitten found a warm bed. She purred and felt happy and safe.",
     "The kitten was cold and lost in the rain. She felt scared and sad."),
    ("Tim won the race at school. Everyone cheered and he felt so glad.",
     "Tim fell down in the race at school. He hurt his knee and felt sad."),
    ("Lucy's friend shared her toys. Lucy smiled and they played all day.",
     "Lucy's friend broke her favorite toy. Lucy was sad and angry."),
    ("The boy got a shiny new bike. He rode it fast and laughed with joy.",
     "The boy's new bike was stolen. He looked everywhere and felt very sad."),
    ("The family went to the beach. The kids played in the sand and had fun.",
     "The family could not go to the beach. The kids were sad and stayed inside."),
    ("Jack's dog came running to him. Jack laughed and played with his dog.",
     "Jack's dog was sick and did not want to play. Jack was worried and sad."),
    ("Emma made a new friend at school. She was happy and excited.",
     "Emma had no friends at school. She was lonely and sad."),
    ("The snowman was big and round. The children laughed and loved it.",
     "The snowman melted in the sun. The children were sad and cried."),
    ("Dad read a funny story at bedtime. Ella giggled and fell asleep smiling.",
     "Dad was too busy to read a story at bedtime. Ella felt sad and cried."),
    ("The flowers in the garden grew big and pretty. Rose was happy and proud.",
     "The flowers in the garden died. Rose was sad and her eyes filled with tears."),
    ("Jake shared his candy with his sister. They both smiled and felt happy.",
     "Jake lost all his candy. He felt sad and his sister was sad too."),
    ("The little fish found his mom in the sea. He was so happy to see her.",
     "The little fish could not find his mom in the sea. He was scared and sad."),
    ("Kate's kite flew high in the sky. She laughed and clapped her hands.",
     "Kate's kite got stuck in a tree and tore. She was sad and cried."),
    ("The old man fixed the toy for Leo. Leo jumped up and down with joy.",
     "The old man could not fix the toy for Leo. Leo was sad and upset."),
    ("It was a sunny day and the children went to the zoo. They loved the animals and had fun.",
     "It was a rainy day and the zoo was closed. The children were sad and went home."),
]  # fmt: skip

# picks the strength only; never scored in the held-out table
TUNING_PROMPTS: list[str] = [
    "Once upon a time, there was a little rabbit named Hoppy. Every day, Hoppy",
    "Sara had a small blue box. One morning, she opened it and",
    "There was a big truck in the town. The truck liked to",
    "A girl named Zoe lived near a lake. One day, Zoe",
    "Once upon a time, a boy named Leo wanted to climb a hill. He",
    "The little duck walked to the pond. When it got there,",
    "Nina and her brother went to the store with their mom. At the store,",
    "One day, a small mouse found a piece of cheese. The mouse",
    "Once upon a time, there was a green frog who lived in a pond. The frog",
    "Ted had a toy car that he took everywhere. One day, Ted",
    "Once upon a time, there was a girl named Rosie who lived on a farm. Rosie",
    "The little owl woke up at night. It looked around and",
    "Jim and his mom went for a walk in the woods. They",
    "Once upon a time, there was a robot named Bolt. Bolt",
    "The puppy ran into the kitchen and",
    "One day, Polly found an old hat in the attic. She",
    "Once upon a time, a little boy named Finn had a drum. Finn",
    "The bunny hopped to the garden. In the garden,",
    "Ellie and Sam made a fort out of blankets. Then",
    "Once upon a time, there was a yellow bus. Every morning, the bus",
]

HELD_OUT_PROMPTS: list[str] = [
    "Once upon a time, there was a little girl named Amy. She went outside and",
    "Once upon a time, there was a boy named Bob. Bob had a red wagon. One day,",
    "There was a cat named Fluffy. Fluffy liked to",
    "Once upon a time, in a small house, there lived a dog named Spot. Spot",
    "Billy went to the park with his dad. At the park,",
    "One day, a little bear went into the woods. In the woods,",
    "Once upon a time, there was a girl named Jenny who had a toy horse. Jenny",
    "The farmer had many cows. One morning, the farmer",
    "Once upon a time, there was a tiny ant. The ant",
    "A boy named Sam walked to school. On the way,",
    "Once upon a time, a princess lived in a big castle. The princess",
    "Lucy looked out of the window and saw",
    "Once upon a time, there was an old tree in the forest. The tree",
    "Tom and Jane were playing in the yard when",
    "One day, a little girl named Sally found a box. Inside the box,",
    "Once upon a time, there was a big ship on the sea. The ship",
    "The little pig wanted to play in the mud. The pig",
    "Once upon a time, there was a boy who liked to draw. He",
    "Mommy took Timmy to the doctor. The doctor",
    "A small bird sat on a branch. The bird looked down and",
    "Once upon a time, there was a teddy bear named Ted. Ted",
    "Anna wanted to bake cookies with her grandma. They",
    "Once upon a time, a little car drove down the road. The car",
    "Joe had a ball. He threw the ball and",
    "One night, Lily looked up at the moon. She",
    "Once upon a time, there was a monkey who lived in a tree. The monkey",
    "Peter went to the beach with his family. At the beach,",
    "There was a little boat in the lake. One day,",
    "Once upon a time, a girl named Mia had a pet fish. Mia",
    "The dog saw a big bone in the garden. The dog",
    "Once upon a time, there was a man who had a hat. The man",
    "Sue and her friend went to the library. They",
    "One day, a lion walked through the jungle. The lion",
    "Once upon a time, there lived a little boy named Jack. Jack liked to",
    "The baby was in the crib. Mom came in and",
    "Once upon a time, there was a purple balloon. The balloon",
    "Grandpa had a big garden. One day, Grandpa",
    "A little turtle walked slowly to the river. The turtle",
    "Once upon a time, a girl named Kim found a key. Kim",
    "The children went to the circus. At the circus,",
    "Once upon a time, there was a king who lived in a castle. One day, the king",
    "Ben had a new pair of shoes. He put them on and",
    "The sheep were in the field. One sheep",
    "Once upon a time, there was a little star in the sky. The star",
    "Molly had a big box of crayons. She",
    "Once upon a time, a boy named Tim saw a big dog. Tim",
    "The wind was blowing outside. Sara put on her coat and",
    "Once upon a time, there was a small house on a hill. In the house,",
    "Dan and his sister found a map. They",
    "Once upon a time, there was an elephant named Ellie. Ellie",
]

HAPPY_WORDS = frozenset("""
happy happily happier happiest smile smiled smiles smiling laugh laughed laughs laughing giggle giggled
fun joy joyful glad love loved loves excited cheer cheered cheerful hug hugged yay wonderful great
enjoy enjoyed proud delighted thankful grateful
""".split())  # fmt: skip
SAD_WORDS = frozenset("""
sad sadly sadder saddest cry cried cries crying tears tear upset lonely alone scared afraid frightened
hurt angry mad sorry lost broken broke frown frowned miss missed unhappy worried fear sick died
""".split())  # fmt: skip

STRENGTHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
MAX_NLL_RISE = 1.0  # nats per token above the unsteered stories
MIN_DISTINCT_RATIO = 0.8  # share of distinct word bigrams, relative to the unsteered stories
MAIN = "mean_diff@1/last"
VARIANTS: list[tuple[str, Method, int, Position]] = [  # name, method, layer, position
    (MAIN, "mean_diff", 1, "last"),
    ("mean_diff@0/last", "mean_diff", 0, "last"),
    ("pca_diff@1/last", "pca_diff", 1, "last"),
    ("mean_diff@1/mean", "mean_diff", 1, "mean"),
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def counts(text: str) -> tuple[int, int]:
    """(#happy, #sad) words in one story."""
    ws = words(text)
    return sum(w in HAPPY_WORDS for w in ws), sum(w in SAD_WORDS for w in ws)


def type_score(text: str) -> int:
    """#distinct sad words - #distinct happy words: the score with loops ("hurt hurt ...") counted once."""
    ws = set(words(text))
    return len(ws & SAD_WORDS) - len(ws & HAPPY_WORDS)


def generate(
    engine: LLMEngine, prompts: list[list[int]], spec: dict[str, Any] | None, max_tokens: int, tag: str
) -> list[list[int]]:
    """Greedy, stopping at end of story; all prompts in one batch."""
    ids = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        seq = Sequence(f"{tag}{i}", list(p), params, [], interventions=engine.registry.prepare(spec))
        engine.add(seq)
        ids.append(seq.seq_id)
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for o in engine.step():
            out[o.seq_id].extend(o.token_ids)
    return [out[i] for i in ids]


@torch.inference_mode()
def mean_nll(ref: Any, prompts: list[list[int]], outs: list[list[int]], eos: set[int]) -> float:
    """Mean per-token NLL of the continuations under the unsteered model: a fluency guard."""
    rows = [(p, [t for t in o if t not in eos]) for p, o in zip(prompts, outs, strict=True)]
    rows = [(p, o) for p, o in rows if o]
    if not rows:
        return 0.0
    width = max(len(p) + len(o) for p, o in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, o) in enumerate(rows):
        ids[i, : len(p) + len(o)] = torch.tensor(p + o)
        mask[i, : len(p) + len(o)] = 1
    logp = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits.float(), -1)
    total = sum(
        -float(logp[i, len(p) - 1 : len(p) + len(o) - 1].gather(1, torch.tensor(o).unsqueeze(1)).sum())
        for i, (p, o) in enumerate(rows)
    )
    return total / sum(len(o) for _, o in rows)


def distinct2(text: str) -> float:
    """Share of distinct word bigrams in a story: low when it loops ("hurt hurt hurt ...")."""
    ws = words(text)
    grams = list(zip(ws, ws[1:], strict=False))
    return len(set(grams)) / len(grams) if grams else 1.0


def steer(vec: TrainedVector, layer: int, scale: float) -> dict[str, Any]:
    return {
        "steering": {
            "vectors": [{"directions": {str(layer): vec.directions[layer].tolist()}, "scale": scale}]
        }
    }


class Runner:
    def __init__(self, engine: LLMEngine, ref: Any, max_tokens: int) -> None:
        self.engine, self.ref, self.max_tokens = engine, ref, max_tokens
        self.eos = set(engine.loaded.eos_token_ids)
        self._n = 0

    def run(self, prompts: list[list[int]], spec: dict[str, Any] | None) -> dict[str, Any]:
        self._n += 1
        outs = generate(self.engine, prompts, spec, self.max_tokens, f"g{self._n}-")
        texts = [self.engine.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        hs = [counts(t) for t in texts]
        scores = [s - h for h, s in hs]
        return {
            "tokens": outs,
            "texts": texts,
            "scores": scores,
            "mean_score": sum(scores) / len(scores),
            "mean_happy": sum(h for h, _ in hs) / len(hs),
            "mean_sad": sum(s for _, s in hs) / len(hs),
            "nll": mean_nll(self.ref, prompts, outs, self.eos),
            "distinct2": sum(map(distinct2, texts)) / len(texts),
            "mean_type_score": sum(map(type_score, texts)) / len(texts),
        }


def sign_test(up: int, down: int) -> float:
    """Two-sided binomial p-value of ups vs downs (ties dropped)."""
    n, k = up + down, min(up, down)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    up = sum(b > a for a, b in zip(base["scores"], other["scores"], strict=True))
    down = sum(b < a for a, b in zip(base["scores"], other["scores"], strict=True))
    n = len(base["scores"])
    same = sum(a == b for a, b in zip(base["tokens"], other["tokens"], strict=True))
    return {"frac_up": up / n, "frac_down": down / n, "sign_test_p": sign_test(up, down), "identical": same}


def summary(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("mean_score", "mean_happy", "mean_sad", "mean_type_score", "nll", "distinct2")
    return {k: r[k] for k in keys}


def fluent(r: dict[str, Any], base: dict[str, Any]) -> bool:
    return r["nll"] <= base["nll"] + MAX_NLL_RISE and r["distinct2"] >= base["distinct2"] * MIN_DISTINCT_RATIO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype="float32", num_kv_blocks=1024))
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok, driver = engine.tokenizer, engine.runner  # the engine's forward driver (collect mode)
    runner = Runner(engine, ref, args.max_tokens)
    # a trailing space: this tokenizer ends words with "▁", so a prompt ending mid-token ("liked to")
    # would make the model finish that token first
    tuning = [tok.encode(t + " ") for t in TUNING_PROMPTS]
    held = [tok.encode(t + " ") for t in HELD_OUT_PROMPTS]
    assert not set(TUNING_PROMPTS) & set(HELD_OUT_PROMPTS)
    # typical residual norm per layer over the tuning prompts' tokens: the unit of `strength`
    res_norm = collect_residuals(driver, tuning, [0, 1], "mean").norm(dim=-1).mean(0).tolist()
    tune_base = runner.run(tuning, None)
    held_base = runner.run(held, None)
    happy, sad = [p for p, _ in PAIRS], [s for _, s in PAIRS]
    variants: dict[str, Any] = {}
    for name, method, layer, position in VARIANTS:
        vec = train_vector(
            driver, tok, happy, sad, layers=[layer], method=method, position=position, progress=False
        )
        norm = float(vec.directions[layer].norm())
        to_scale = lambda s, layer=layer, norm=norm: s * res_norm[layer] / norm  # noqa: E731
        sweep = []
        for strength in STRENGTHS:
            r = runner.run(tuning, steer(vec, layer, -to_scale(strength)))
            ok = fluent(r, tune_base)
            sweep.append({"strength": strength, "scale": -to_scale(strength), **summary(r), "fluent": ok})
        ok_runs = [s for s in sweep if s["fluent"]] or sweep[:1]
        best = max(ok_runs, key=lambda s: (s["mean_score"], -s["strength"]))
        strength = best["strength"]
        zero = runner.run(held, steer(vec, layer, 0.0))
        sadder = runner.run(held, steer(vec, layer, -to_scale(strength)))
        happier = runner.run(held, steer(vec, layer, to_scale(strength)))
        curve = []  # every strength on the held-out prompts: context only, never used to choose
        for x in STRENGTHS if name == MAIN else ():
            r = sadder if x == strength else runner.run(held, steer(vec, layer, -to_scale(x)))
            curve.append({"strength": x, "scale": -to_scale(x), **summary(r), **compare(held_base, r)})
        variants[name] = {
            "method": method,
            "layer": layer,
            "position": position,
            "train": vec.summary(),
            "direction_norm": norm,
            "tuning_sweep": sweep,
            "chosen_strength": strength,
            "chosen_scale_sadder": -to_scale(strength),
            "held_out_curve": curve,
            "held_out": {
                "unsteered": {**summary(held_base), "scores": held_base["scores"]},
                "scale_0": {**summary(zero), **compare(held_base, zero), "scores": zero["scores"]},
                "sadder": {**summary(sadder), **compare(held_base, sadder), "scores": sadder["scores"]},
                "happier": {**summary(happier), **compare(held_base, happier), "scores": happier["scores"]},
            },
            "examples": [
                {
                    "prompt": HELD_OUT_PROMPTS[i],
                    "unsteered": held_base["texts"][i],
                    "sadder": sadder["texts"][i],
                    "happier": happier["texts"][i],
                }
                for i in range(3)
            ],  # fmt: skip
        }
    result = {
        "model": os.path.relpath(args.model, ROOT),
        "command": "python bench/steering_happy_sad.py",
        "device": "cpu float32",
        "host": platform.platform(),
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "decoding": "greedy, stops at end of story",
        "num_pairs": len(PAIRS),
        "num_tuning_prompts": len(TUNING_PROMPTS),
        "num_held_out_prompts": len(HELD_OUT_PROMPTS),
        "score": "per story: #sad words - #happy words (fixed lists below), generated text only",
        "happy_words": sorted(HAPPY_WORDS),
        "sad_words": sorted(SAD_WORDS),
        "strength": "|scale * d| / mean residual norm at that layer (tuning prompts)",
        "residual_norm": res_norm,
        "selection": (
            f"max mean score on the tuning prompts among strengths with NLL <= unsteered + {MAX_NLL_RISE} "
            f"nats and distinct-2 >= {MIN_DISTINCT_RATIO} x unsteered; the held-out prompts are not used"
        ),
        "tuning_unsteered": summary(tune_base),
        "variants": variants,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"\nwrote {out}")


def print_tables(result: dict[str, Any]) -> None:
    base = result["tuning_unsteered"]
    for name, v in result["variants"].items():
        ref = f"unsteered: NLL {base['nll']:.2f}, dist2 {base['distinct2']:.2f}"
        print(f"\n{name}: tuning sweep, sadder sign ({ref})")
        print(f"{'strength':>8} {'scale':>8} {'score':>6} {'NLL':>5} {'dist2':>5} fluent")
        for s in v["tuning_sweep"]:
            cells = f"{s['strength']:8.3f} {s['scale']:8.2f} {s['mean_score']:6.2f} {s['nll']:5.2f}"
            print(f"{cells} {s['distinct2']:5.2f} {s['fluent']}")
    main = result["variants"][MAIN]
    print(
        f"\n{MAIN}: every strength on the held-out prompts (context only; chosen: {main['chosen_strength']})"
    )
    print(f"{'strength':>8} {'scale':>8} {'score':>6} {'NLL':>5} {'dist2':>5} {'up':>5} {'down':>5}")
    for c in main["held_out_curve"]:
        cells = f"{c['strength']:8.3f} {c['scale']:8.2f} {c['mean_score']:6.2f} {c['nll']:5.2f}"
        print(f"{cells} {c['distinct2']:5.2f} {c['frac_up']:5.2f} {c['frac_down']:5.2f}")
    print(f"\nheld-out: {result['num_held_out_prompts']} prompts, {result['max_tokens']} tokens, greedy")
    head = (
        f"{'variant':<18} {'condition':<10} {'scale':>8} {'score':>6} {'happy':>5} {'sad':>5} {'types':>5} "
    )
    print(head + f"{'NLL':>5} {'dist2':>5} {'up':>5} {'down':>5} {'p':>8} {'same':>4}")
    for name, v in result["variants"].items():
        scale = v["chosen_scale_sadder"]
        for cond, r in v["held_out"].items():
            x = {"unsteered": "-", "scale_0": "0", "sadder": f"{scale:.2f}", "happier": f"{-scale:.2f}"}[cond]
            line = f"{name:<18} {cond:<10} {x:>8} {r['mean_score']:6.2f} {r['mean_happy']:5.2f} "
            line += f"{r['mean_sad']:5.2f} {r['mean_type_score']:5.2f} {r['nll']:5.2f} {r['distinct2']:5.2f}"
            if "frac_up" in r:
                line += (
                    f" {r['frac_up']:5.2f} {r['frac_down']:5.2f} {r['sign_test_p']:8.1e} {r['identical']:4d}"
                )
            print(line)


if __name__ == "__main__":
    main()
