"""What the interpreter-start hook costs a script that never uses hf-compress.

Rows run interleaved (hook on, hook off, on, off, …), each in a fresh interpreter, several repeats; medians are
reported. Scripts: a bare ``import transformers``, and a tokenizer-only script (``AutoTokenizer`` on the default
model's cached folder, skipped when that is absent). Peak RSS is the child's ``ru_maxrss``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

from _results import write_section

TITLE = "## Import cost of the interpreter-start hook"
REPEATS = 7
PROBE = """
import json, resource, sys, time
t = time.perf_counter()
{body}
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "modules": len(sys.modules), "torch": "torch" in sys.modules,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def scripts() -> dict[str, str]:
    out = {"import transformers": "import transformers"}
    from hf_compress.models import cache_dir

    folder = cache_dir() / "smollm2-135m-instruct-fp32"
    if (folder / "tokenizer.json").is_file():
        out["tokenizer only"] = f"from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained({str(folder)!r})"
    return out


def measure(body: str, hook: bool) -> dict:
    env = {**os.environ, "HF_COMPRESS_AUTOLOAD": "1" if hook else "0", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.expanduser("~"))
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch
    import transformers

    import hf_compress

    rows = []
    for name, body in scripts().items():
        runs = {True: [], False: []}
        for _ in range(REPEATS):
            for hook in (True, False):
                runs[hook].append(measure(body, hook))
        med = {h: {k: statistics.median(r[k] for r in runs[h]) for k in ("seconds", "modules", "peak_rss_mb")}
               for h in runs}
        rows.append((name, med, any(r["torch"] for r in runs[True])))
        print(name, med, flush=True)
    lines = [TITLE, "",
             f"Command: `python benchmarks/import_cost.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"no GPU · hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, Python {platform.python_version()} · date: {datetime.date.today().isoformat()}", "",
             f"Each script in a fresh interpreter, hook on and off interleaved, {REPEATS} repeats, medians. "
             "`HF_COMPRESS_AUTOLOAD=0` switches the hook off.", "",
             "| script | seconds (hook on) | seconds (off) | ratio | modules (on) | modules (off) | peak RSS MB (on) | peak RSS MB (off) | torch imported with hook |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, med, torch_on in rows:
        on, off = med[True], med[False]
        lines.append(f"| {name} | {on['seconds']:.3f} | {off['seconds']:.3f} | {on['seconds'] / off['seconds']:.3f} | "
                     f"{on['modules']:.0f} | {off['modules']:.0f} | {on['peak_rss_mb']:.0f} | {off['peak_rss_mb']:.0f} | "
                     f"{'yes' if torch_on else 'no'} |")
    write_section(TITLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
