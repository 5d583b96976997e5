"""The named experiments of ``reproduce.py``: which rows (models) are trained and evaluated on
which evaluation sets, and the paper's published numbers to print beside ours.

A row is ``base`` (the model as given), a variant below, trained once per seed (stage 2 with
that seed, then stage 3), or an inference row: another row's models answered with another
``eval_data.py --inference`` (compared with base and with that row). An evaluation set is ``train`` (the ``--data`` file), ``kv`` (``--kv_data``,
the NQ-trained rows on key-value retrieval) or ``nqK`` (``K``-document NQ built from ``--oracle``).
Positions: ``paper`` = 0,5,10,15,last; ``all``; ``every5`` = 0,5,10,...,last; or a list.
Edit this file to add a variant or an experiment; ``python reproduce.py list`` prints them.
"""

PAPER_POSITIONS = "0,5,10,15,last"

# stage 2 (strengthen: anchor copies; filter: correct answers only) and stage 3 (--kd_coef a,b,c,d
# = kd, lm, rank, adaptive) of each trained row
VARIANTS = {
    "seqkd": {"kd_coef": "0,1,0,0", "strengthen": 1, "title": "SeqKD (cross-entropy on the teacher's answers)"},
    "kl": {"kd_coef": "1,0,0,0", "strengthen": 0, "title": "KL, no anchors"},
    "align": {"kd_coef": "0,0,0,1", "strengthen": 0, "title": "KL + align (adaptive weights), no anchors"},
    "p2d": {"kd_coef": "0,0,0,1", "strengthen": 1, "title": "+ anchor = Pos2Distill"},
    "kl_anchor": {"kd_coef": "1,0,0,0", "strengthen": 1, "title": "KL with anchors"},
    "p2d_nofilter": {"kd_coef": "0,0,0,1", "strengthen": 1, "filter": False,
                     "title": "Pos2Distill on unfiltered answers (control)"},
}

# row -> (the row whose models it evaluates, eval_data.py --inference); PINE runs on the hf backend,
# one GPU per evaluation, at reproduce.py's --pine_batch
INFERENCE_ROWS = {
    "pine": {"model": "base", "inference": "pine", "title": "base model with PINE (training-free)"},
    "p2d_pine": {"model": "p2d", "inference": "pine", "title": "Pos2Distill checkpoint with PINE"},
}

EXPERIMENTS = {
    "table1": {"about": "base model's accuracy at each gold position (no training)",
               "rows": ["base"], "evals": ["train"]},
    "table3": {"about": "ablation: base, SeqKD, KL, + align, + anchor (Pos2Distill), KL with anchors",
               "rows": ["base", "seqkd", "kl", "align", "p2d", "kl_anchor"], "evals": ["train"]},
    "kv": {"about": "Pos2Distill trained on --data, evaluated on key-value retrieval (--kv_data)",
           "rows": ["base", "p2d"], "evals": ["kv"]},
    "docs": {"about": "Pos2Distill trained on --data, evaluated on 10, 30 and 50 NQ documents (--oracle)",
             "rows": ["base", "p2d"], "evals": ["nq10", "nq30", "nq50"]},
    # issue 19; bench: benchmarks/bench_pine.py on the base model (PINE's prompts/s against plain)
    "pine": {"about": "base, PINE, Pos2Distill, Pos2Distill + PINE; is PINE flat; PINE's cost (bench_pine.py)",
             "rows": ["base", "pine", "p2d", "p2d_pine"], "evals": ["train"], "bench": True},
}

# The paper's numbers (accuracy %, NQ, 20 documents, last 500 questions). Source: arXiv 2508.15709
# (Wang et al., "Position Bias Mitigates Position Bias"), as transcribed in the project's method
# notes; not re-checked against the PDF here. The paper's columns 1/5/10/15/20 are read as our
# positions 0,5,10,15,last (the reference evaluation). Per-position numbers exist for base only;
# None: the paper reports no number for that row.
PAPER = {
    "table3": {
        "model": "Qwen1.5-7B-Chat",
        "source": "arXiv 2508.15709, ablation on NQ (20 documents)",
        "rows": {
            "base": {"positions": {0: 73.6, 5: 57.3, 10: 56.9, 15: 57.3, "last": 60.9}, "average": 61.2},
            "seqkd": {"average": 60.2},
            "kl": {"average": 65.1},
            "align": {"average": 66.7},
            "p2d": {"average": 68.4},
            "kl_anchor": {"average": None},
        },
    },
    "table1": {
        "model": "Qwen1.5-7B-Chat",
        "source": "arXiv 2508.15709, main results on NQ (20 documents); also Mistral-7B-Instruct-v0.3 "
                  "64.8 and Llama-3-8B-Instruct 59.4 base averages",
        "rows": {"base": {"positions": {0: 73.6, 5: 57.3, 10: 56.9, 15: 57.3, "last": 60.9}, "average": 61.2}},
    },
}


def positions_for(spec: str, total: int) -> str:
    """An --positions value for eval_data.py: ``paper``, ``every5``, ``all`` or a list as given."""
    if spec == "paper":
        return PAPER_POSITIONS if total > 15 else "all"  # fewer documents: the paper's slots do not exist
    if spec == "every5":
        picks = list(range(0, total, 5))
        return ",".join(str(p) for p in picks + ([total - 1] if (total - 1) % 5 else []))
    return spec
