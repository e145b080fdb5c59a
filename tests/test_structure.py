"""The layout's rules, read from the code's own imports (tools/imports.py parses every file; nothing is imported).

Each module may import only modules listed before it in ORDER: data flows one way, from the base through the stages
of ``mla convert`` in pipeline order to the recovery, the measurements and the one door, ``convert/cli.py``.
"""

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import imports  # noqa: E402  (tools/imports.py: the import graph)

ORDER = [
    # the base every stage may use
    "convert", "convert.errors", "convert.cache", "convert.files", "convert.device", "convert.nll",
    "mla_modeling.configuration_mla", "mla_modeling.modeling_mla", "mla_modeling",
    # the stages of mla convert, in pipeline order
    "convert.download", "convert.adapters", "convert.gguf_memo", "convert.weights", "convert.sources", "convert.readers",
    "convert.data",
    "convert.layerwise", "convert.calibrate", "convert.ropesplit", "convert.factorize", "convert.assemble",
    "convert.save", "convert.deepseek", "convert.allocate", "convert.export", "convert.verify",
    "convert.config", "convert.card", "convert.pipeline",
    # mla gguf (a deepseek_v3 export as a llama.cpp GGUF)
    "convert.gguf_vocab", "convert.gguf_export",
    # mla finetune
    "convert.recover.config", "convert.recover.checkpoint", "convert.recover.losses", "convert.recover.teacher_cache",
    "convert.recover.windows",
    "convert.recover.memory", "convert.recover.shard",
    "convert.recover.models", "convert.recover.local", "convert.recover.export", "convert.recover.recipe",
    "convert.recover.run", "convert.recover",
    # what measures (a library convert/ never imports)
    "eval", "eval.llama_cpp", "eval.llama_run", "eval.llama_bench", "eval.llama_patch",
    "eval.kernels", "eval.report", "eval.bigbench", "eval.tasks.mla_tasks", "eval.perplexity", "eval.bench",
    "eval.bench_convert", "eval.evaluate", "eval.sweep",
    # the commands and the door
    "convert.commands", "convert.cli",
]


def test_every_module_has_a_place_and_imports_only_what_comes_before_it():
    edges, _ = imports.graph()
    assert sorted(edges) == sorted(ORDER)  # a new file gets its place in ORDER
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = [(m, t) for m, targets in edges.items() for t in targets if rank[t] >= rank[m]]
    assert upward == []


def test_no_import_cycle():
    edges, _ = imports.graph()
    assert imports.cycles(edges) == []
    # the rule catches one: a graph with a back edge has a cycle
    assert imports.cycles({**edges, "convert.errors": {"convert.cli"}}) != []


def test_convert_never_imports_eval():
    edges, _ = imports.graph()
    assert [(m, t) for m, ts in edges.items() for t in ts if m.startswith("convert") and t.startswith("eval")] == []


def test_imports_inside_functions_say_why():
    _, lazy = imports.graph()
    assert all("#" in text for _, _, text in lazy), lazy
    assert len(lazy) <= 1  # the CLI's quiet_library_warnings (transformers) only


def test_mla_help_loads_no_torch():
    code = ("import sys\nfrom convert.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert "bench-convert" in out and "finetune" in out  # the whole command table is listed
