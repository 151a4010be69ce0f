"""The evaluation run behind `python -m openrlhf_sapo.eval` (see the package docstring): arguments,
generation, grading, the metrics and report files."""


from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_sapo.eval",
        description="Evaluate a model on math benchmarks (common jsonl format) and write results.json, "
        "samples.jsonl and table.md (the paper's Table 1 layout). Exit codes: 0 done, 2 bad arguments or input.",
    )
    p.add_argument("--model", required=True, help="model folder (or hub id, if cached) to evaluate")
    p.add_argument(
        "--benchmarks",
        nargs="+",
        required=True,
        metavar="NAME=PATH|PATH",
        help="benchmark files: NAME=file.jsonl, a file.jsonl (named by its rows' benchmark/datasource key, else "
        "its stem), or a folder of <name>.jsonl files (a data-preparation folder: its test.jsonl)",
    )
    p.add_argument("--output-dir", required=True, help="where results.json, samples.jsonl and table.md go")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --output-dir")
    p.add_argument("--label", default=None, help="row name in table.md (default: the model folder's name)")
    p.add_argument("--compare-paper", choices=("3b", "7b"), default=None, help="add the paper's published Table 1 rows")

    g = p.add_argument_group("generation")
    g.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                   help="auto: vllm if CUDA is available and vllm imports, else hf (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: %(default)s, the paper's)")
    g.add_argument("--top-p", type=float, default=0.95, help="(default: %(default)s, the paper's)")
    g.add_argument("--n-samples", type=int, default=1,
                   help="samples per prompt; >1 adds mean@n and pass@n (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=2048,
                   help="(default: %(default)s, the paper's response length)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="prompts per generate call (default: 8 for hf, 256 for vllm)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each benchmark")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--system-prompt", default=None, help="a system message before each prompt (default: none)")
    g.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text (text-only base models)")
    g.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on GPU, float32 on CPU (hf); vllm's auto")
    g.add_argument("--device", default=None, help="hf backend device (default: cuda if available, else cpu)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm only (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm only (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="vllm only (default: the model's)")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--grading-timeout", type=float, default=None,
                   help="seconds per answer for the grader (default: its own)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> None:
    if args.n_samples < 1:
        raise UsageError(f"--n-samples must be >= 1, got {args.n_samples}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.grading_timeout is not None and not args.grading_timeout > 0:
        raise UsageError(f"--grading-timeout must be > 0, got {args.grading_timeout}")


def _norm_text(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}", r"\1", s)
    return " ".join(s.replace("$", "").split()).lower().rstrip(".")


def score_generations(example, texts: list, timeout_s: Optional[float]) -> list:
    """Grade the responses of one row: [{"correct", "extracted", "reason"}]. Never raises.

    With `choices`, an answer that is the text of the labelled option (not its letter) counts too."""
    from openrlhf_sapo.rewards import grading

    kwargs = {"format_weight": 0.0}
    if timeout_s is not None:
        kwargs["timeout_s"] = timeout_s
    scored = grading.score_responses(texts, [example.label] * len(texts), example.answer_type, **kwargs)
    out = []
    for text, s in zip(texts, scored):
        try:
            extracted = grading.extract_final_answer(text)
        except Exception:  # noqa: BLE001 - a response that cannot be parsed scores 0
            extracted = None
        correct, reason = s.get("accuracy", 0.0) >= 1.0, s.get("reason", "?")
        if not correct and extracted is not None and example.choices:
            idx = ord(example.label) - ord("A") if len(example.label) == 1 and "A" <= example.label <= "Z" else -1
            want = example.choices[idx] if 0 <= idx < len(example.choices) else example.label
            if _norm_text(extracted) == _norm_text(want):
                correct, reason = True, "ok (matched the option's text)"
        out.append({"correct": bool(correct), "extracted": extracted, "reason": reason})
    return out


def _prepare_output_dir(path: str, overwrite: bool) -> None:
    os.makedirs(path, exist_ok=True)
    existing = [f for f in ("results.json", "samples.jsonl", "table.md") if os.path.exists(os.path.join(path, f))]
    if existing and not overwrite:
        raise UsageError(f"--output-dir {path} already holds {', '.join(existing)}; pass --overwrite to replace them")
    for f in existing:
        os.remove(os.path.join(path, f))


def _as_generation(g):
    from openrlhf_sapo.eval.generate import Generation

    if isinstance(g, Generation):
        return g
    if isinstance(g, str):
        return Generation(text=g)
    raise TypeError(f"a backend returned {type(g).__name__}, expected str or Generation")


def run(args) -> dict:
    from tqdm import tqdm

    import openrlhf_sapo.eval.benchmarks as bm
    import openrlhf_sapo.eval.generate as gen
    import openrlhf_sapo.eval.report as report

    _check_args(args)
    benches = bm.load_benchmarks(args.benchmarks, limit=args.limit)
    _prepare_output_dir(args.output_dir, args.overwrite)
    config = gen.GenerationConfig(
        temperature=args.temperature, top_p=args.top_p, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
        seed=args.seed, system_prompt=args.system_prompt, chat_template=not args.no_chat_template, dtype=args.dtype,
        device=args.device, tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        trust_remote_code=args.trust_remote_code,
    )
    backend_name = gen.choose_backend(args.backend)
    batch_size = args.batch_size or (256 if backend_name == "vllm" else 8)
    label = args.label or os.path.basename(os.path.normpath(args.model))
    print(
        f"evaluating {args.model} with {backend_name} on {', '.join(f'{b.name} ({len(b.examples)})' for b in benches)}",
        file=sys.stderr,
    )
    started = time.time()
    backend = gen.create_backend(backend_name, args.model, config, benches)

    metrics = {}
    samples_path = os.path.join(args.output_dir, "samples.jsonl")
    with open(samples_path, "w", encoding="utf-8") as samples_file:
        for bench in benches:
            per_prompt = []
            bar = tqdm(total=len(bench.examples), desc=bench.name, unit="prompt", disable=args.no_progress)
            for start in range(0, len(bench.examples), batch_size):
                batch = bench.examples[start : start + batch_size]
                outputs = backend.generate(batch)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"backend returned {len(outputs)} results for {len(batch)} prompts")
                for ex, gens in zip(batch, outputs):
                    gens = [_as_generation(g) for g in gens]
                    if len(gens) != args.n_samples:
                        raise RuntimeError(
                            f"backend returned {len(gens)} samples for row {ex.id!r}, expected {args.n_samples}"
                        )
                    scores = score_generations(ex, [g.text for g in gens], args.grading_timeout)
                    rows = []
                    embedded = any(i.startswith("data:") for i in ex.images)
                    for k, (g, s) in enumerate(zip(gens, scores)):
                        rec = {
                            "benchmark": bench.name, "id": ex.id, "sample": k, "prompt": ex.prompt,
                            "images": len(ex.images) if embedded else ex.images,
                            "label": ex.label, "answer_type": ex.answer_type, "response": g.text,
                            "extracted": s["extracted"], "correct": s["correct"], "reason": s["reason"],
                            "num_tokens": g.num_tokens, "truncated": g.truncated,
                        }
                        samples_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        rows.append(rec)
                    per_prompt.append(rows)
                samples_file.flush()
                bar.update(len(batch))
            bar.close()
            metrics[bench.name] = report.benchmark_metrics(per_prompt, args.n_samples)
            metrics[bench.name]["file"] = bench.path
            m = metrics[bench.name]
            print(f"{bench.name}: accuracy {100 * m['accuracy']:.2f}% over {m['count']} prompts", file=sys.stderr)
    close = getattr(backend, "close", None)
    if close is not None:
        close()

    averages = {}
    for key, names in (("table1", bm.VLM_BENCHMARKS), ("text", bm.TEXT_BENCHMARKS)):
        avg = report.average(metrics, names)
        if avg is not None:
            averages[key] = avg
    results = {
        "model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
        "label": label,
        "backend": backend_name,
        "benchmarks": metrics,
        "averages": averages,
        "config": {
            k: getattr(args, k)
            for k in ("temperature", "top_p", "n_samples", "max_new_tokens", "limit", "seed", "system_prompt",
                      "no_chat_template", "dtype", "grading_timeout", "compare_paper")
        }
        | {"batch_size": batch_size, "format_weight": 0.0},
        "elapsed_s": round(time.time() - started, 3),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    table = report.render_tables(metrics, label, args.compare_paper, args.n_samples, args.temperature, args.top_p)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return results


def main(argv: Optional[list] = None) -> int:
    from openrlhf_sapo.eval.benchmarks import BenchmarkError
    from openrlhf_sapo.eval.generate import GenerationSetupError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, BenchmarkError, GenerationSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
