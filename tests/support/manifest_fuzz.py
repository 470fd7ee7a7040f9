"""Hostile manifests: a fixed corpus of mutants of examples/quickstart.yaml, and the check that
runs them through everything `codistill run` and the cluster do before any process starts.

`corpus()` is deterministic (one seeded generator), so a failure names a case that the next run
reproduces. `python -m tests.support.manifest_fuzz FOLDER START` checks the cases written to
FOLDER (`<id>.yaml`, in corpus order) from index START on, one JSON line per case on stdout, in
a process with bounded memory and a per-case deadline: a case that blows up or hangs kills only
that process, and the caller attributes it to the first case without a line.
"""

from __future__ import annotations

import faulthandler
import json
import random
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# The quickstart with a bucket, so that the unmutated base also passes the cluster's check.
BASE = QUICKSTART.read_text() + "  storage: {url: s3://codistill-fuzz/runs}\n"
SEED = 20261201
MEMORY_LIMIT = 2 * 1024**3  # bytes of address space for the checking process
CASE_TIMEOUT_S = 60.0  # the slowest case (100k keys) takes 6 s of CPU, 25 s on a busy machine
LONG = "x" * 100_000

# Bad values for a leaf: one of each JSON type, edges of ranges, non-finite floats, huge sizes.
ALWAYS = [True, None, [1, 2], LONG]
SOMETIMES = [False, [], {}, {"a": 1}, -1, 0, 1, 2**31, 2**63, 10**30, -0.5, 0.5, 2.0, 1e308,
             1e-300, float("nan"), float("inf"), float("-inf"), "", "x", "2", "nan", "true",
             "\u00e9\u2028\x85\x1c", "[/x]"]
PER_LEAF = 2  # values drawn from SOMETIMES for each leaf, besides ALWAYS


@dataclass(frozen=True)
class Case:
    id: str  # a file name: letters, digits, '.', '-', '_'
    category: str
    data: bytes


def _base() -> dict[str, Any]:
    return yaml.safe_load(BASE)


def _dump(doc: Any) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10**9).encode()


def _with(path: str, value: Any, drop: bool = False) -> bytes:
    """quickstart.yaml with the dotted `path` set to `value` (or removed)."""
    doc = _base()
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if drop:
        node.pop(last, None)
    else:
        node[last] = value
    return _dump(doc)


PLACEHOLDER = "@@VALUE@@"  # safe_dump writes it quoted: '@@VALUE@@'


def _with_text(path: str, text: str) -> bytes:
    """quickstart.yaml with the dotted `path` set to the YAML `text` as written: a form or tag
    that no dumped value shows, or a long plain string (PyYAML's emitter takes a second for
    100,000 characters)."""
    return _with(path, PLACEHOLDER).replace(f"'{PLACEHOLDER}'".encode(), text.encode())


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix]
    return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}{key}.")]


def leaf_paths() -> list[str]:
    """Every field of the fully defaulted quickstart run, e.g. `spec.training.optimizer.lr`."""
    from codistill import spec

    resolved = spec.load(QUICKSTART).resolved()
    return [p.rstrip(".") for p in _leaves(resolved)]


def _text(doc: str) -> bytes:
    return doc.encode()


# The start of cases that give a spec of their own; most omit the bucket, so only `codistill run`
# would take them.
HEAD = "apiVersion: codistill.io/v1alpha1\nkind: Codistillation\nmetadata: {name: fuzz}\n"


def _nested(depth: int, kind: str) -> str:
    if kind == "flow-list":
        return "[" * depth + "1" + "]" * depth
    if kind == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    raise ValueError(kind)


def _block_nested(depth: int) -> str:
    """`a:` mappings `depth` levels deep under spec.task.args, in block style."""
    lines = [f"{'  ' * (3 + i)}a{i}:" for i in range(depth)]
    return HEAD + "spec:\n  task:\n    args:\n" + "\n".join(lines) + " 1\n"


def _leaf_cases(rng: random.Random) -> list[Case]:
    cases = []
    for path in leaf_paths():
        for i, value in enumerate(ALWAYS + rng.sample(SOMETIMES, PER_LEAF)):
            data = _with_text(path, value) if value is LONG else _with(path, value)
            cases.append(Case(f"leaf-{path}-{i}", "leaf value", data))
    return cases


def _named_cases() -> list[Case]:
    names = ["", "A", "-x", "x-", "1abc", "a" * 62, "a" * 64, "quick_start", "quick.start",
             "quickstart\n", "[/x]", "\u00fcni", "x y", "../../x", 12]
    namespaces = ["", "Team", "a" * 63, "a" * 64, "a.b", "x\n", "../../../../x", "kube-system",
                  7, None]
    return ([Case(f"name-{i}", "metadata.name", _with("metadata.name", v))
             for i, v in enumerate(names)]
            + [Case(f"namespace-{i}", "metadata.namespace", _with("metadata.namespace", v))
               for i, v in enumerate(namespaces)])


def _missing_cases() -> list[Case]:
    paths = ["apiVersion", "kind", "metadata", "metadata.name", "spec", "spec.task",
             "spec.task.name", "spec.training", "spec.training.optimizer", "spec.distillation",
             "spec.groups"]
    cases = [Case(f"missing-{p}", "missing section", _with(p, None, drop=True)) for p in paths]
    cases.append(Case("missing-spec-empty", "missing section", _with("spec", {})))
    return cases


def _unknown_cases() -> list[Case]:
    levels = ["", "metadata.", "spec.", "spec.task.", "spec.task.args.", "spec.training.",
              "spec.training.optimizer.", "spec.distillation.", "spec.storage.", "spec.runPolicy.",
              "spec.template.", "spec.template.spec.", "status."]
    return [Case(f"unknown-{level or 'top.'}colour", "unknown field",
                 _with(f"{level}colour", "red")) for level in levels]


def _document_cases() -> list[Case]:
    docs = {"list": "- a\n- b\n", "string": "just a string\n", "int": "42\n", "null": "~\n",
            "bool": "true\n", "empty-list": "[]\n", "quoted": "'kind: Codistillation'\n",
            "kind-only": "kind: Codistillation\n", "kind-list": "kind: [Codistillation]\n",
            "kind-map": "kind: {Codistillation: 1}\n"}
    return [Case(f"document-{k}", "non-mapping document", _text(v)) for k, v in docs.items()]


def _multidoc_cases() -> list[Case]:
    run = BASE
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\n"
    docs = {"two-runs": run + "---\n" + run, "secret-first": secret + "---\n" + run,
            "then-list": run + "---\n- a\n", "then-scalar": run + "---\nhello\n",
            "then-empty": run + "---\n---\n", "end-marker": run + "...\n",
            "then-garbage": run + "---\n{unclosed\n", "secret-only": secret,
            "run-in-list": "- " + run.replace("\n", "\n  ")}
    return [Case(f"multidoc-{k}", "multi-document", _text(v)) for k, v in docs.items()]


def _empty_cases() -> list[Case]:
    docs = {"zero": b"", "newline": b"\n", "marker": b"---\n", "comment": b"# nothing\n",
            "spaces": b"   \n\t\n", "marker-end": b"---\n...\n"}
    return [Case(f"empty-{k}", "empty file", v) for k, v in docs.items()]


def _bytes_cases(rng: random.Random) -> list[Case]:
    run = BASE
    docs = {
        "random": rng.randbytes(512),
        "random-after-head": HEAD.encode() + rng.randbytes(256),
        "utf16-bom": run.encode("utf-16"),
        "utf16be-bom": b"\xfe\xff" + run.encode("utf-16-be"),
        "utf16le-no-bom": run.encode("utf-16-le"),
        "utf32": run.encode("utf-32"),
        "utf8-bom": b"\xef\xbb\xbf" + run.encode(),
        "bom-in-middle": run.replace("spec:", "\ufeffspec:").encode(),
        "nul-in-value": run.replace("quickstart", "quick\x00start").encode(),
        "nul-at-end": run.encode() + b"\x00",
        "latin1-value": run.replace("lm ", "caf\xe9 ").encode("latin-1"),
        "control-char": run.replace("quickstart", "quick\x07start").encode(),
        "escaped-surrogate": (HEAD + 'spec: {task: {args: {s: "\\ud800"}}}\n').encode(),
        "crlf": run.replace("\n", "\r\n").encode(),
        "cr-only": run.replace("\n", "\r").encode(),
        "tab-indent": run.replace("  ", "\t").encode(),
        "truncated": run.encode()[: len(run) // 2],
        "overlong-utf8": run.replace("quickstart", "quick").encode() + b"\xc0\xaf\n",
    }
    return [Case(f"bytes-{k}", "bytes and encodings", v) for k, v in docs.items()]


def _yaml11_cases() -> list[Case]:
    forms = {"groups-yes": ("spec.groups", "yes"), "groups-on": ("spec.groups", "on"),
             "suspend-yes": ("spec.runPolicy.suspend", "yes"),
             "suspend-off": ("spec.runPolicy.suspend", "off"), "name-no": ("metadata.name", "no"),
             "name-null": ("metadata.name", "Null"), "groups-octal": ("spec.groups", "02"),
             "groups-octal-o": ("spec.groups", "0o2"), "groups-hex": ("spec.groups", "0x2"),
             "steps-sexagesimal": ("spec.training.steps", "1:30"),
             "steps-underscore": ("spec.training.steps", "2_000"),
             "lr-dotless-exponent": ("spec.training.optimizer.lr", "3e-4"),
             "lr-leading-dot": ("spec.training.optimizer.lr", ".5"),
             "lr-sexagesimal": ("spec.training.optimizer.lr", "1:30.5"),
             "temperature-inf": ("spec.distillation.temperature", ".inf"),
             "temperature-nan": ("spec.distillation.temperature", ".NaN"),
             "args-date": ("spec.task.args.when", "2026-12-01"),
             "args-timestamp": ("spec.task.args.when", "2026-12-01T10:00:00Z"),
             "name-date": ("metadata.name", "2026-12-01"), "groups-plus": ("spec.groups", "+2")}
    return [Case(f"yaml11-{key}", "YAML 1.1 forms", _with_text(path, text))
            for key, (path, text) in forms.items()]


def _tag_cases() -> list[Case]:
    args = {"python-object": "!!python/object:os.system {}",
            "python-apply": "!!python/object/apply:os.system ['touch PWNED']",
            "python-name": "!!python/name:os.system ''", "python-tuple": "!!python/tuple [1, 2]",
            "ruby": "!ruby/object:Gem::Installer {}", "local": "!thing 1",
            "binary-utf8": "!!binary aGVsbG8=", "binary-raw": "!!binary gAD/",
            "set": "!!set {a, b}", "omap": "!!omap [{a: 1}, {b: 2}]",
            "pairs": "!!pairs [{a: 1}, {a: 2}]", "timestamp": "!!timestamp 2026-12-01",
            "float-int": "!!float 1", "int-map-keys": "{1: a, 2: b}",
            "mixed-map-keys": "{1: a, b: c}", "null-key": "{~: a}", "bool-key": "{true: a}",
            "nested-mixed-keys": "{x: {1: a, b: c}}", "complex-key": "{? [a, b] : c}"}
    cases = [Case(f"tag-args-{k}", "tags", (HEAD + f"spec: {{task: {{args: {{v: {v}}}}}}}\n")
                  .encode()) for k, v in args.items()]
    fields = {"groups-str": ("spec.groups", "!!str 2"), "groups-int": ("spec.groups", "!!int '2'"),
              "name-binary": ("metadata.name", "!!binary cXVpY2s="),
              "steps-float": ("spec.training.steps", "!!float 2000"),
              "name-python": ("metadata.name", "!!python/str quickstart"),
              "template-set": ("spec.template", "!!set {spec}"),
              "top-keys-int": ("spec.distillation", "{1: 2}"),
              "long-tag": ("spec.groups", f"!{LONG} 2")}
    cases += [Case(f"tag-{key}", "tags", _with_text(path, text))
              for key, (path, text) in fields.items()]
    directives = {"yaml-1.1": "%YAML 1.1\n---\n", "yaml-1.2": "%YAML 1.2\n---\n",
                  "yaml-2.0": "%YAML 2.0\n---\n", "tag-directive": "%TAG !e! tag:e.com,2000:\n---\n"}
    cases += [Case(f"tag-directive-{k}", "tags", (v + BASE).encode())
              for k, v in directives.items()]
    return cases


def _laughs(levels: int, width: int) -> str:
    lines = ["l0: &l0 [lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}"


def _alias_cases() -> list[Case]:
    bomb = _laughs(10, 10)
    docs = {"laughs-args": HEAD + f"spec: {{task: {{args: {bomb}}}}}\n",
            "laughs-template": HEAD + f"spec: {{template: {{metadata: {{annotations: {bomb}}}}}}}\n",
            "laughs-scheduling": HEAD + f"spec: {{runPolicy: {{schedulingPolicy: {bomb}}}}}\n",
            "laughs-top": bomb + "\n",
            "wide-laughs": HEAD + f"spec: {{task: {{args: {_laughs(4, 1000)}}}}}\n",
            "simple": HEAD + "spec: {groups: &g 2, workersPerGroup: *g}\n",
            "merge-key": HEAD + "base: &b {groups: 2}\nspec: {<<: *b}\n",
            "recursive": HEAD + "spec: {task: {args: {a: &a [*a]}}}\n",
            "undefined": HEAD + "spec: {groups: *nothing}\n",
            "anchor-only": HEAD + "spec: {groups: &g 2}\n",
            "merge-inline": HEAD + "spec: {<<: {groups: 2}, workersPerGroup: 1}\n"}
    return [Case(f"alias-{k}", "aliases", _text(v)) for k, v in docs.items()]


def _nesting_cases() -> list[Case]:
    cases = []
    for depth in (50, 200, 300, 400, 600, 900, 1000, 3000, 10000):
        for kind in ("flow-list", "flow-map"):
            cases.append(Case(f"nest-args-{kind}-{depth}", "deep nesting", _text(
                HEAD + f"spec: {{task: {{args: {{a: {_nested(depth, kind)}}}}}}}\n")))
    for depth in (200, 400, 900, 3000):
        cases.append(Case(f"nest-args-block-{depth}", "deep nesting", _text(_block_nested(depth))))
        template = f"{{metadata: {{annotations: {{a: {_nested(depth, 'flow-list')}}}}}}}"
        cases.append(Case(f"nest-template-{depth}", "deep nesting",
                          _text(HEAD + f"spec: {{template: {template}}}\n")))
        cases.append(Case(f"nest-scheduling-{depth}", "deep nesting", _text(
            HEAD + f"spec: {{runPolicy: {{schedulingPolicy: {_nested(depth, 'flow-map')}}}}}\n")))
    cases.append(Case("nest-top-10000", "deep nesting", _text(_nested(10000, "flow-list"))))
    return cases


def _duplicate_cases() -> list[Case]:
    run = BASE
    docs = {"groups": run.replace("  groups: 2 ", "  groups: 2\n  groups: 64 "),
            "name": run.replace("  name: quickstart", "  name: quickstart\n  name: other"),
            "spec": run + "spec: {groups: 1}\n", "flow": HEAD + "spec: {groups: 1, groups: 3}\n"}
    return [Case(f"duplicate-{k}", "duplicate key", _text(v)) for k, v in docs.items()]


def _template_cases() -> list[Case]:
    templates = {"env-string": {"spec": {"containers": [{"name": "pytorch", "env": "x"}]}},
                 "env-item-string": {"spec": {"containers": [{"name": "pytorch", "env": ["x"]}]}},
                 "env-item-no-name": {"spec": {"containers": [{"name": "pytorch",
                                                              "env": [{"value": "1"}]}]}},
                 "containers-map": {"spec": {"containers": {"name": "pytorch"}}},
                 "containers-strings": {"spec": {"containers": ["pytorch"]}},
                 "container-no-name": {"spec": {"containers": [{"image": "x"}]}},
                 "container-name-int": {"spec": {"containers": [{"name": 1}]}},
                 "security-string": {"spec": {"containers": [{"name": "pytorch",
                                                             "securityContext": "x"}]}},
                 "pod-security-list": {"spec": {"securityContext": [1]}},
                 "volumes-map": {"spec": {"volumes": {"a": 1}}},
                 "mounts-int": {"spec": {"containers": [{"name": "p", "volumeMounts": 3}]}},
                 "spec-string": {"spec": "x"}, "metadata-list": {"metadata": ["x"]},
                 "labels-list": {"metadata": {"labels": ["x"]}},
                 "unknown-key": {"kind": "Pod"}, "list": ["x"], "string": "x",
                 "sidecar": {"spec": {"containers": [{"name": "side", "image": "busybox"}]}}}
    return [Case(f"template-{k}", "pod template", _with("spec.template", v))
            for k, v in templates.items()]


def _large_cases() -> list[Case]:
    block = "".join("        " + "y" * 70 + "\n" for _ in range(40_000))  # about 3 MB
    keys = "".join(f"      k{i}: {i}\n" for i in range(100_000))
    unknown = "".join(f"  k{i}: {i}\n" for i in range(10_000))
    errors = "".join(f"    k{i}: {i}\n" for i in range(2_000))
    return [Case("large-3mb-block", "large file",
                 _text(HEAD + "spec:\n  task:\n    args:\n      c: |\n" + block)),
            Case("large-100k-keys", "large file", _text(HEAD + "spec:\n  task:\n    args:\n" + keys)),
            Case("large-10k-unknown", "large file", _text(HEAD + "spec:\n" + unknown)),
            Case("large-2k-unknown-training", "large file",
                 _text(HEAD + "spec:\n  training:\n" + errors)),
            Case("large-1mb-name", "large file", _with_text("metadata.name", "a" * 1_000_000)),
            Case("large-long-unknown-key", "large file", _with(f"spec.{LONG}", 1)),
            Case("large-5000-digit-groups", "large file",
                 _text(HEAD + f"spec: {{groups: {'1' * 5000}}}\n")),
            Case("large-5000-digit-arg", "large file",
                 _text(HEAD + f"spec: {{task: {{args: {{a: -0x{'f' * 5000}}}}}}}\n")),
            Case("large-long-anchor", "large file", _text(HEAD + f"spec: {{groups: *{LONG}}}\n"))]


def _capacity_cases() -> list[Case]:
    shapes = {"cluster-sized": (64, 1024, 1), "gpus": (2, 1, 64), "many-groups": (64, 1, 1),
              "within": (2, 1, 1)}
    cases = []
    for key, (groups, workers, nproc) in shapes.items():
        doc = _base()
        doc["metadata"]["name"] = "q"
        doc["spec"].update(groups=groups, workersPerGroup=workers, nprocPerWorker=nproc)
        cases.append(Case(f"capacity-{key}", "capacity", _dump(doc)))
    return cases


def corpus() -> list[Case]:
    """The corpus, the same on every call and machine."""
    rng = random.Random(SEED)
    cases = (_leaf_cases(rng) + _named_cases() + _missing_cases() + _unknown_cases()
             + _document_cases() + _multidoc_cases() + _empty_cases() + _bytes_cases(rng)
             + _yaml11_cases() + _tag_cases() + _alias_cases() + _nesting_cases()
             + _duplicate_cases() + _template_cases() + _large_cases() + _capacity_cases())
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"
    return cases


def write(cases: list[Case], folder: Path) -> None:
    """Each case as `<id>.yaml`, and their ids in corpus order as `cases.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / f"{case.id}.yaml").write_bytes(case.data)
    (folder / "cases.txt").write_text("".join(f"{case.id}\n" for case in cases))


def check(path: Path) -> dict[str, Any]:
    """What `codistill run` makes of one file: `accepted`, `refused` with the SpecError's
    message and the stage that raised it, or `error` (any other exception, with its traceback);
    `cluster` is what `validation.check` (the operator, `codistill validate`) makes of it."""
    from codistill import spec, validation
    from codistill.pytorchjob import render_jobs
    from codistill_trainer.cli.launch import check_capacity, local_run_url

    stage, cluster = "load", "refused"
    try:
        # spec.load(path) is spec.parse(spec.read(path), str(path)): the file is read once,
        # as the 100k-key case alone takes seconds to read
        doc = spec.read(path)
        stage = "cluster"
        try:
            validation.check(doc, str(path))
            cluster = "accepted"
        except spec.SpecError as e:
            cluster = str(e)
        stage = "load"
        run = spec.parse(doc, str(path))
        stage = "run.json"  # what launch.prepare writes, as Bucket.put_json encodes it
        json.dumps(run.resolved(), indent=1, sort_keys=True).encode()
        stage = "render"
        render_jobs(run, local_run_url(run, path.parent))
        stage = "capacity"
        check_capacity(run)
    except spec.SpecError as e:
        return {"outcome": "refused", "stage": stage, "error": str(e), "cluster": cluster}
    except BaseException as e:  # noqa: BLE001 - any other exception is what this looks for
        return {"outcome": "error", "stage": stage, "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-3000:]}
    return {"outcome": "accepted", "cluster": cluster}


def main(folder: str, start: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    ids = (Path(folder) / "cases.txt").read_text().split()
    for case_id in ids[int(start):]:
        # A hang, even inside native code, ends this process with the stacks on stderr.
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        began = time.monotonic()
        result = check(Path(folder) / f"{case_id}.yaml")
        faulthandler.cancel_dump_traceback_later()
        seconds = round(time.monotonic() - began, 3)
        print(json.dumps({"id": case_id, "seconds": seconds, **result}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
