"""docs/metrics.md, written from the metric families in `metrics.py` and their meanings:
`python -m sae_ray.config.glossary > docs/metrics.md` (tests/test_docs.py keeps it current)."""

from __future__ import annotations

from sae_ray.config import metrics as M

HEAD = """# Metrics

Generated from `sae_ray/config/metrics.py` by `python -m sae_ray.config.glossary`; do not
edit by hand. Every cycle of every trial reports these as results.csv's columns (and
seeds.csv's, per seed). A name measures the validation split unless it starts `test/`,
the held-out split, which a sweep reports and never selects on. `control/<metric>` is the
same metric of the λ = 0 model of the trial's seed and cycle through an SAE of the trial's
settings, and `delta/<metric>` the trial's minus it (for the paired metrics below).
"""

# (title, names as results.csv spells them with {m} for the family's key, family, note)
SECTIONS = [
    ("The classifier", ["val/{m}", "test/{m}"], M.TASK, "classification sweeps"),
    ("The causal LM", ["{m}"], M.LM, "`model.task: causal_lm`"),
    ("The SAE", ["sae/{m}"], M.SAE, ""),
    ("The SAE spliced into the LM", ["sae/{m}"], M.LM_SAE, "`model.task: causal_lm`"),
    ("The dictionary's features", ["features/{m}"], M.FEATURES, "on validation tokens"),
    (
        "SAEBench's sparse probing",
        ["saebench/{m}", "test/saebench/{m}"],
        M.SAEBENCH,
        "classification sweeps; each class against the rest, balanced, at the pooled "
        "position; `test/` probes fitted on train and scored on the held-out split",
    ),
    (
        "SAEBench's first-letter absorption",
        ["absorption/{m}"],
        M.ABSORPTION,
        "on validation tokens, the first half fitting the letter probes and main latents, "
        "the second scored; its differences from SAEBench are in `method/absorption.py`",
    ),
    (
        "A ground-truth sweep",
        ["gt/{m}"],
        M.GROUND_TRUTH,
        "`dataset.name: synthetic:synthsae`: SAELens's `eval_sae_on_synthetic_data` on "
        "fresh draws from the synthetic world, against its known features",
    ),
    (
        "The structure comparison with the control's SAE",
        ["structure/{m}"],
        M.STRUCTURE,
        "each trial's SAE against the SAE of its paired λ = 0 model (same seed, cycle and "
        "settings); `delta/features/...` give the same comparison of the dictionaries' "
        "statistics",
    ),
    (
        "Interpretability",
        ["interp/{m}", "test/interp/{m}", "base/{m}", "test/base/{m}"],
        M.INTERP,
        "classification sweeps; `interp/` reads the SAE's codes at the pooled position, "
        "`base/` the same dense activations without the SAE",
    ),
    ("How the cycle's model was fine-tuned", ["finetune/{m}"], M.FINETUNE, ""),
    ("The targets this cycle's SAE built", ["targets/{m}"], M.TARGETS, "cycles that build them"),
    ("Where the cycle's time and memory went", ["{m}"], M.RUN, ""),
]


def meanings() -> dict[str, str]:
    """Every metric a cycle reports, by its results.csv name, with its meaning."""
    out: dict[str, str] = {}
    for _, spellings, family, _ in SECTIONS:
        for key, meaning in family.items():
            for spelling in spellings:
                if key == "time/{stage}_s":
                    out.update({f"time/{s}_s": meaning for s in M.STAGES})
                elif "{k}" in key:
                    name = spelling.format(m=key)
                    out.update({name.format(k=k): meaning for k in M.SAEBENCH_KS})
                else:
                    out[spelling.format(m=key)] = meaning
    for head in ("", "test/"):
        for k in M.SPARSE_PROBES:
            out[f"{head}interp/sparse_probe_accuracy@{k}"] = f"{M.SPARSE_PROBE} (k = {k})"
    for metric in M.PAIRED:
        base = out.get(metric, metric)
        out[f"control/{metric}"] = f"{metric} of the paired λ = 0 model ({base})"
        out[f"delta/{metric}"] = f"{metric} minus control/{metric}"
    return out


def glossary() -> str:
    lines = [HEAD]
    for title, spellings, family, note in SECTIONS:
        lines += [f"## {title}", ""]
        if note:
            lines += [f"{note[0].upper()}{note[1:]}.", ""]
        lines += ["| metric | meaning |", "| --- | --- |"]
        names = " ".join(f"`{s}`" for s in spellings)
        lines += [f"| {names.replace('{m}', key)} | {meaning} |" for key, meaning in family.items()]
        lines.append("")
    probes = ", ".join(f"`sparse_probe_accuracy@{k}`" for k in M.SPARSE_PROBES)
    lines += [f"Also in `interp/` and `test/interp/`: {probes}, {M.SPARSE_PROBE}.", ""]
    lines += ["## Paired with the control", "", "`control/` and `delta/` of each of:", ""]
    lines += [f"- `{m}`" for m in M.PAIRED]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(glossary(), end="")
