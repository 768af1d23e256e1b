"""README's "Use" section runs as written, on 6 gloo processes (as `torchrun --nproc-per-node 6`)."""

import os
import re
import subprocess
import sys

from tests.harness.local_world import free_port

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def use_snippet():
    text = open(README).read()
    section = text[text.index("## Use\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_use_snippet_runs_and_loads_under_new_layouts(tmp_path):
    (tmp_path / "use.py").write_text(use_snippet())
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="6",
               PYTHONPATH=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
    procs = [subprocess.Popen([sys.executable, "use.py"], cwd=tmp_path, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(6)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    assert (tmp_path / "ckpt" / "step100" / "manifest.json").exists()
