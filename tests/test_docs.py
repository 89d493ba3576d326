"""Every ```python block of the docs, the README and the public docstrings runs.

Blocks of one page run in order in one namespace, as a reader would paste them. A
block preceded by the line `<!-- skip-test -->` is skipped (for code that needs a
GPU, a network, or a long time)."""

import inspect
import pathlib
import re

import eqx_ademamix as eam
import jax
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
SKIP = "<!-- skip-test -->"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, dedented, without skipped ones."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP:
            continue
        indent = match.group("indent")
        lines = match.group("code").splitlines()
        blocks.append(
            "\n".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines
            )
        )
    return blocks


def run_blocks(blocks: list[str], name: str, namespace: dict) -> None:
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"block {i} of {name} failed:\n{code}") from e


@pytest.fixture(autouse=True)
def standard_promotion():
    # Documentation code is user code: it runs under JAX's default promotion rules,
    # not the strict ones the package's own tests use.
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_fence_parser():
    text = (
        "a\n```python\nx = 1\n```\n<!-- skip-test -->\n```python\nraise ValueError\n"
        "```\n    ```python\n    y = x + 1\n    ```\n```bash\nfalse\n```\n"
    )
    assert python_blocks(text) == ["x = 1", "y = x + 1"]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_page_code_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)  # files a page writes land in a scratch directory
    run_blocks(blocks, str(page.relative_to(ROOT)), {"__name__": "__docs__"})


def _docstrings_with_code():
    """(name, docstring) of every public object and method whose docstring has a
    python block."""
    for name in eam.__all__:
        obj = getattr(eam, name)
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [
                (f"{name}.{attr}", member)
                for attr, member in vars(obj).items()
                if inspect.isfunction(member)
            ]
        for member_name, member in members:
            doc = inspect.getdoc(member) or ""
            if python_blocks(doc):
                yield member_name, doc


def test_some_docstrings_have_code():
    assert len(list(_docstrings_with_code())) >= 3


@pytest.mark.parametrize(
    "name,doc", [pytest.param(n, d, id=n) for n, d in _docstrings_with_code()]
)
def test_docstring_code_runs(name, doc):
    blocks = python_blocks(doc)
    import equinox as eqx
    import jax.numpy as jnp

    namespace = {"eam": eam, "eqx": eqx, "jax": jax, "jnp": jnp}
    run_blocks(blocks, name, namespace)


def test_every_public_name_is_in_the_api_reference():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        text = page.read_text()
        documented |= set(re.findall(r"^::: eqx_ademamix\.(\w+)", text, re.M))
    missing = sorted(set(eam.__all__) - documented)
    assert not missing, f"add `::: eqx_ademamix.X` lines to docs/api/ for {missing}"
