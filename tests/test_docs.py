"""What users read is true: public docstrings name exactly their parameters, every CLI option has help text,
the documented command lines parse, the examples' --help shows defaults."""
import argparse
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ppap_fast

REPO = Path(__file__).resolve().parents[1]


def _params(fn) -> list[str]:
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__init__" in vars(obj) and obj.__init__.__doc__:
        doc += "\n" + inspect.getdoc(obj.__init__)
    return doc


def _documented_names(doc: str) -> set[str]:
    """Names the docstring presents as parameters: ``name``: entries and the entries of an Args: section."""
    names = set(re.findall(r"(?:^|\. |; )``(\w+)``:", doc, re.M))
    args = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.M)
    if args:
        for entry in re.findall(r"^    ([\w, ]+):", args[1], re.M):
            names |= {n.strip() for n in entry.split(",")}
    return names


# the submodules' API the README shows (their classes' own methods are not walked)
README_API = [
    "experts.save_experts", "experts.load_experts", "experts.load_experts_into", "experts.export_peft",
    "experts.import_ppap_checkpoint", "experts.ExpertBank.merged", "distill.distill_ppap", "guidance.input_transform",
    "fast_sampling.recommended_options", "integrations.diffusers.PPAPGuidance",
    "integrations.diffusers.PPAPGuidance.correct", "integrations.diffusers.PPAPGuidance.clip_first",
    "integrations.diffusers.PPAPGuidedPipeline", "integrations.diffusers.PPAPGuidedPipeline.__call__",
    "integrations.diffusers.fuse_norm_act", "models.ADMUNet", "models.ADMUNet.from_checkpoint",
    "models.ADMUNet.fuse_norm_act", "testing.check_adm_golden", "testing.check_adm_manifest",
    "testing.check_guided_golden", "testing.check_ppap_checkpoint_manifest", "ops.backend_report",
]


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("ppap_fast." + ".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


# modules whose __all__ is public API beside ppap_fast's own: the ops (README "Ops and backends")
PUBLIC_MODULES = ["ops", "ops.lora", "ops.norm", "ops.channel_sums"]


def _with_methods(name, obj):
    yield name, obj
    if inspect.isclass(obj):
        for attr, raw in vars(obj).items():
            fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
            if not attr.startswith("_") and inspect.isfunction(fn):
                yield f"{name}.{attr}", getattr(obj, attr)


def _public_callables():
    for dotted in README_API:
        yield dotted, _resolve(dotted)
    for name in ppap_fast.__all__:
        yield from _with_methods(name, getattr(ppap_fast, name))
    seen = set()
    for module in PUBLIC_MODULES:
        mod = _resolve(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            is_error = inspect.isclass(obj) and issubclass(obj, BaseException)  # takes a message
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not is_error and id(obj) not in seen:
                seen.add(id(obj))
                yield from _with_methods(f"{module}.{name}", obj)


@pytest.mark.parametrize("name, obj", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_docstring_names_exactly_its_parameters(name, obj):
    doc = _doc(obj)
    assert doc.strip(), f"{name} has no docstring"
    params = _params(obj)
    undocumented = [p for p in params if not re.search(rf"(?<![\w.]){re.escape(p)}(?!\w)", doc)]
    assert not undocumented, f"{name}: parameters never named in its docstring: {undocumented}"
    unknown = sorted(_documented_names(doc) - set(params))
    assert not unknown, f"{name}: its docstring documents parameters it does not take: {unknown}"


def test_docstring_checker_catches_a_stale_parameter_name():
    def f(target, scale=1.0):
        """Guidance. ``labels``: long [B, H, W]. ``scale``: the strength."""

    assert _documented_names(_doc(f)) - set(_params(f)) == {"labels"}
    assert [p for p in _params(f) if not re.search(rf"(?<![\w.]){p}(?!\w)", _doc(f))] == ["target"]


def test_every_public_name_imports_and_is_documented():
    readme = (REPO / "README.md").read_text() + "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    for name in ppap_fast.__all__:
        obj = getattr(ppap_fast, name)
        assert obj.__module__.startswith("ppap_fast."), name
        assert name in readme or inspect.getdoc(obj), name
    for name in sorted(ppap_fast._SUBMODULES):  # ppap_fast.<name> imports lazily through __getattr__
        assert getattr(ppap_fast, name).__doc__, f"ppap_fast.{name} has no module docstring"


def test_readme_says_which_images_score_takes_by_default():
    """A user scoring 1-channel samples met the registry's ImageNet channel count only as an error."""
    from ppap_fast.models.registry import GUIDES

    channels = {len(g.mean) for g in GUIDES.values() if g.task == "classification"}
    assert channels == {3}, channels
    readme = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    score_docs = readme[readme.index("Did it work? `ppap-fast score"):]
    sentence = next((s for s in score_docs.split(". ") if "3-channel" in s), "")
    assert "`--classifier tiny:" in sentence and "py:" in sentence, "README: score's 3-channel default is unstated"


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()


def _parsers():
    from ppap_fast.cli import _parser as cli_parser
    from ppap_fast.distributed import _parser as dist_parser

    for prog, p in (("ppap-fast", cli_parser()), ("python -m ppap_fast.distributed", dist_parser())):
        yield prog, p
        for name, s in _subparsers(p):
            yield f"{prog} {name}", s


@pytest.mark.parametrize("prog, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_cli_option_has_help_and_shows_its_default(prog, parser):
    assert parser.description, f"{prog} --help says nothing about what it does"
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = "/".join(a.option_strings) or a.dest
        bare = (a.help or "").replace("(default: %(default)s)", "").replace("default: %(default)s", "").strip()
        assert bare, f"{prog} {flag} has no help text"
        if a.option_strings and not a.required and a.default not in (None, False, argparse.SUPPRESS) \
                and not isinstance(a, argparse._StoreFalseAction):
            assert "default" in a.help, f"{prog} {flag}: --help does not show its default {a.default!r}"


def test_mutually_exclusive_options_are_stated_in_help():
    from ppap_fast.cli import _parser

    guided = dict(_subparsers(_parser()))["guided-sample"]
    no_fast = next(a for a in guided._actions if "--no-fast" in a.option_strings)
    for fast_only in ("--guide-dtype", "--cuda-graph", "--compile", "--fuse-norm-act"):  # refused with --no-fast
        assert fast_only in no_fast.help, no_fast.help
    for a in guided._actions:  # refused without --guide (check_config)
        if a.dest in ("guide_weights", "guide_task", "experts", "raw_input", "targets", "target_map", "ignore_index"):
            assert "needs --guide" in a.help, (a.option_strings, a.help)


def _doc_commands():
    """Command lines of ppap-fast / ppap_fast.distributed in README.md and docs/*.md: fenced blocks whole,
    inline code spans (which may name only some options)."""
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = f.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        fenced = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        inline = [m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", prose)]
        for complete, lines in ((True, fenced), (False, inline)):
            for ln in lines:
                ln = re.split(r"\s+#", ln)[0].strip()
                if re.search(r"ppap-fast |-m ppap_fast\.distributed ", ln) and not re.search(r"\.\.\.|[|<\[]", ln):
                    yield f"{f.name}: {ln}", complete


@pytest.mark.parametrize("line, complete", list(_doc_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_parses(line, complete):
    from ppap_fast.cli import _parser as cli_parser
    from ppap_fast.distributed import _parser as dist_parser

    toks = shlex.split(line.split(": ", 1)[1].replace("$W", "W"))
    if "ppap-fast" in toks:
        args, parser = toks[toks.index("ppap-fast") + 1:], cli_parser()
    else:
        args, parser = toks[toks.index("ppap_fast.distributed") + 1:], dist_parser()
    if complete:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"does not parse: {line}")
    else:  # a fragment: each option it names exists in its subcommand
        subs = dict(_subparsers(parser))
        sub = next((subs[a] for a in args if a in subs), parser)
        known = {o for a in [*parser._actions, *sub._actions] for o in a.option_strings}
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
        assert not unknown, f"{line}: no such option {unknown}"


def test_doc_command_extraction_finds_the_documented_pipeline():
    lines = [ln for ln, _ in _doc_commands()]
    assert any("distill --weights-dir" in ln for ln in lines) and any("guided-sample" in ln for ln in lines)
    assert any("ppap_fast.distributed distill" in ln for ln in lines)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_example_help_shows_every_default(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = re.findall(r"^  (--[\w-]+)", proc.stdout, re.M)
    assert "--out" in options and "--device" in options, proc.stdout
    assert proc.stdout.count("(default:") == len(options), \
        f"{script} --help: an option shows no default:\n{proc.stdout}"
