"""Plain vs chat-templated calibration of an instruct model, over several draws of float rounding.

    python benchmarks/chat_calibration.py [--recipe w4a16-g128-rot-gptq] [--draws 5] [--windows 8]
                                          [--out results/chat_calibration]

Sequential GPTQ is chaotic in float rounding (one flipped code changes every later Hessian), so one
compile is one draw: a W4 perplexity on SmolLM2-135M moves by ~2.5% and a chat answer can flip. Each
draw here compiles the recipe on the bundled SmolLM2 with its weights multiplied by
``1 + 1e-6 N(0, 1)`` (seed = draw - 1; draw 0 is the weights as they are), once calibrated on the
Brown slice as it is and once on the same text in the chat template (``finegrain.data.chat_text``,
``--calib-chat``). Per draw: WikiText-2 perplexity (the first ``--windows`` windows of 2048, the
reference backend over float-stored weights) and greedy answers (16 tokens) to ``PROMPTS``, scored
by keywords (two of the colors for "Name three colors."); fp32's answers are scored the same way.
Writes ``<out>.json`` (every answer) and ``<out>.md`` (the table); ~2.5 min per compile on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown"]
PROMPTS = [("What is the capital of France?", ["paris"]), ("What is the capital of Germany?", ["berlin"]),
           ("What is the capital of Italy?", ["rome"]), ("What is the capital of Japan?", ["tokyo"]),
           ("Name three colors.", COLORS), ("What is the largest planet in our solar system?", ["jupiter"]),
           ("How many days are in a week?", ["seven", "7"])]


def _score(answer: str, keys: list[str]) -> bool:
    hits = sum(k in answer.lower() for k in keys)
    return hits >= (2 if keys is COLORS else 1)


def _ask(tok, generate) -> list[dict]:
    out = []
    for q, keys in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        answer = tok.decode(generate(ids), skip_special_tokens=True)
        out.append({"prompt": q, "answer": answer, "correct": _score(answer, keys)})
    return out


def main(argv: list[str] | None = None) -> int:
    from finegrain.data import brown, chat_text
    from finegrain.jobs import compile_loaded, evaluate_lm
    from finegrain.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="w4a16-g128-rot-gptq")
    ap.add_argument("--draws", type=int, default=5, help="compiles per calibration (draw 0: the weights as they are)")
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--out", default="results/chat_calibration")
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    tok = lm.tokenizer
    texts = {"plain": brown(), "chat": chat_text(brown(), tok)}
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def fp_gen(ids):
        with torch.no_grad():
            return lm.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos)[0, ids.shape[1]:]

    fp_answers = _ask(tok, fp_gen)
    fp_ppl = evaluate_lm(lm, tok, 2048, args.windows, progress=False)["ppl"]
    print(f"fp32: ppl {fp_ppl:.3f}, {sum(a['correct'] for a in fp_answers)} of {len(PROMPTS)} answers", flush=True)
    rows = []
    for draw in range(args.draws):
        for name, text in texts.items():
            m = load_model(args.model)
            if draw:
                gen = torch.Generator().manual_seed(draw - 1)
                with torch.no_grad():
                    for p in m.model.parameters():
                        p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=gen))
            t0 = time.perf_counter()
            cm = compile_loaded(m, args.recipe, kv_cache=True, progress=False, calib_text=text)
            s = cm.session(weight_storage="float")
            answers = _ask(tok, lambda ids: s.generate(ids, 16, eos_token_id=eos).tokens)
            ppl = evaluate_lm(s.run, tok, 2048, args.windows, progress=False)["ppl"]
            rows.append({"calibration": name, "draw": draw, "ppl": ppl, "correct": sum(a["correct"] for a in answers),
                         "answers": answers, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"draw {draw} {name}: ppl {ppl:.3f}, {rows[-1]['correct']} of {len(PROMPTS)} answers, "
                  f"{rows[-1]['seconds']} s", flush=True)

    lines = [f"{args.model}, {args.recipe}, {args.draws} draws per calibration, WikiText-2 {args.windows} x 2048 "
             f"(fp32 {fp_ppl:.3f}); answers scored by keyword, fp32 {sum(a['correct'] for a in fp_answers)} of "
             f"{len(PROMPTS)}", "",
             "| calibration | ppl per draw | mean ppl (sd) | Δ vs fp32 | answers right per draw | "
             + " | ".join(q.split("?")[0].replace("What is the ", "").replace(".", "") for q, _ in PROMPTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(PROMPTS)]
    for name in texts:
        r = [x for x in rows if x["calibration"] == name]
        p = [x["ppl"] for x in r]
        sd = statistics.stdev(p) if len(p) > 1 else 0.0
        per = [sum(x["answers"][i]["correct"] for x in r) for i in range(len(PROMPTS))]
        lines.append(f"| {texts[name].name} | {' / '.join(f'{v:.3f}' for v in p)} | {statistics.mean(p):.3f} ({sd:.3f}) "
                     f"| {100 * (statistics.mean(p) / fp_ppl - 1):+.2f}% | {' / '.join(str(x['correct']) for x in r)} | "
                     + " | ".join(f"{c}/{len(r)}" for c in per) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"fp32": {"ppl": fp_ppl, "answers": fp_answers}, "draws": rows},
                                                   indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
