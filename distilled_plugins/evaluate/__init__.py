"""Stage 6: MATH-500 evaluation with a stated protocol, a report and a chart.

Usage:
    # an OpenAI-compatible endpoint serving the fine-tuned model (vLLM, vLLM-MindSpore, MindIE):
    python -m distilled_plugins.evaluate --api-addr localhost:8000 --model OpenR1-Qwen-7B --dst eval/
    # mindformers' own generation from the stage 5 checkpoint (the tutorial's way):
    python -m distilled_plugins.evaluate --checkpoint finetune/checkpoint \\
        --mindformers-config configs/finetune_tiny_cpu.yaml --tokenizer configs/tokenizer_tiny --limit 20 \\
        --max-new-tokens 64 --dst eval/
    # re-score completions made elsewhere:
    python -m distilled_plugins.evaluate --rescore outputs.jsonl --problem-column question \\
        --gold-column answer --completion-column code --dst eval/

Protocol (open-r1's values by default, all parameters, all written into the report): the system prompt
"Please reason step by step, and put your final answer within \\boxed{}.", temperature 0.6, top_p 0.95, up to
32,768 new tokens, 4 samples per problem, seed 0. pass@1 is the mean over all samples, with a 95% confidence
interval over problems; completions are graded by stage 2's grader (same math_verify semantics, same worker
processes). Completions are kept in ``--dst`` (also ``--out``, ``--output-dir``) under ``completions/<fingerprint>/``,
one folder per source (a checkpoint's files, an endpoint and model) and protocol: a rerun with the same ones requests
only the missing completions, one with another checkpoint makes new ones beside the old.

Modules: :mod:`.config` (the protocol and the settings), :mod:`.completions` (the evaluation set, the completions
kept per source and settings), :mod:`.endpoint` and :mod:`.checkpoint` (the two sources), :mod:`.scoring` (grading,
pass@1 and its breakdowns), :mod:`.report` (report.json, report.md, accuracy.png), :mod:`.stage` (``run``).
"""

from distilled_plugins.evaluate.config import EvalConfig, Protocol

__all__ = ["EvalConfig", "Protocol"]
