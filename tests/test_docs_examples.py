"""Every code block in README.md and docs/ runs in the test suite, so the examples never rot.

* ``python`` blocks: the blocks of one page run in order, in one namespace, in a fresh working
  folder, as a reader pasting them into one session would. Examples load models by their hub
  names: a Hugging Face cache made for the session (offline) holds a tiny random checkpoint
  under each name in :data:`HUB`, so ``from_pretrained("meta-llama/Llama-3.2-1B")`` and
  ``UNet2DConditionModel.from_pretrained(..., subfolder="unet")`` load small random models
  through the libraries' own code. Files an example names as if the reader had them (a
  Stable Diffusion LoRA from the web) are made in the working folder (:data:`FILES`), and
  ``./data`` holds a small synthetic MNIST (the pipeline reads it like the real one).
  ``torch.compile`` runs with the ``"eager"`` backend here (dynamo still traces the model; the
  compiler itself is tested in ``tests/test_compile.py``).
* ``bash`` blocks are checked, not run: ``pip install`` names only extras and packages that
  ``pyproject.toml`` declares, ``lora-param-mnist`` options parse, scripts and test paths exist.
  Any other command is an error.
* A block that cannot run here is preceded by ``<!-- skip-test: the reason -->``; such blocks
  stay few (:data:`MAX_SKIPPED`). ``text`` / ``json`` / ``toml`` / ``yaml`` blocks are output
  or file listings and are not run; a fence without a language is an error.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import struct
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MAX_SKIPPED = 6
RUN = {"python"}
CHECK = {"bash"}
SHOWN = {"text", "json", "toml", "yaml"}

_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*$")
_SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    skip: str | None  # the reason given in a skip-test marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page (indented ones too: admonitions, lists)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(previous)
        found.append(Block(page, i + 2, m["lang"], code, skip["reason"] if skip else None))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --------------------------------------------------------------------------- the blocks themselves


def test_every_block_says_what_it_is() -> None:
    bad = [b.where for b in ALL if b.lang not in RUN | CHECK | SHOWN]
    assert not bad, f"fenced blocks need a language ({sorted(RUN | CHECK | SHOWN)}): {bad}"


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [b for b in ALL if b.skip is not None]
    assert all(b.skip for b in skipped), [b.where for b in skipped if not b.skip]
    assert all(b.lang in RUN | CHECK for b in skipped), "only code blocks can be skipped"
    assert len(skipped) <= MAX_SKIPPED, [f"{b.where}: {b.skip}" for b in skipped]


def test_the_pages_hold_examples() -> None:
    """The collection works: a parser that found nothing would make every test below vacuous."""
    assert len([b for b in ALL if b.lang in RUN]) >= 40
    assert any(b.page.name == "README.md" and b.lang == "python" for b in ALL)


def test_optional_dependencies_of_a_page() -> None:
    assert optional_dependencies("import torch\nfrom lora_param import add_lora\n") == set()
    code = "from transformers import AutoModelForCausalLM, BitsAndBytesConfig\nimport peft\n"
    assert optional_dependencies(code) == {"transformers", "peft", "bitsandbytes"}


def test_the_parser_reads_markers_indents_and_shown_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- skip-test: needs a GPU -->\n```bash\ntorchrun x.py\n```\n\n"
        "!!! note\n    ```python\n    x = 1\n    print(x)\n    # 1\n    ```\n",
        encoding="utf-8",
    )
    gpu, note = (Block(b.page, b.line, b.lang, b.code, b.skip) for b in blocks(page))
    assert (gpu.lang, gpu.skip, gpu.code) == ("bash", "needs a GPU", "torchrun x.py\n")
    assert (note.lang, note.skip, note.line) == ("python", None, 10)
    assert note.code == "x = 1\nprint(x)\n# 1\n"
    assert shown_output(note.code) == ["1"]


# --------------------------------------------------------------------------- shell blocks


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _check_pip(args: list[str]) -> None:
    project = _pyproject()["project"]
    extras = set(project["optional-dependencies"])
    declared = {
        _name(r)
        for group in [project["dependencies"], *project["optional-dependencies"].values()]
        for r in group
    }
    specs = [a for a in args if not a.startswith("-")]
    assert specs, "pip install of nothing"
    for spec in specs:
        local = re.fullmatch(r"(?:\.|lora[-_]param)(?:\[(?P<extras>[\w,-]+)\])?", spec)
        if local:
            unknown = set((local["extras"] or "").split(",")) - extras - {""}
            assert not unknown, f"extras {unknown} are not in pyproject.toml ({sorted(extras)})"
        else:
            assert _name(spec) in declared, f"{spec!r} is not a dependency pyproject.toml declares"


def _check_mnist(args: list[str]) -> None:
    from lora_param.mnist.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"lora-param-mnist {shlex.join(args)}: {err.getvalue()}") from e


def _check_command(words: list[str]) -> None:
    if words[:2] == ["python", "-m"] and len(words) > 2:
        module, rest = words[2], words[3:]
        if module == "venv" or module == "mkdocs" or module == "build":
            return
        if module == "pip":
            return _check_command(["pip", *rest])
        if module == "pytest":
            return _check_command(["pytest", *rest])
        if module == "lora_param.mnist":
            return _check_mnist(rest)
        raise AssertionError(f"unknown module in `python -m {module}`")
    head, rest = words[0], words[1:]
    if head in (".", "source"):
        assert rest and rest[0].endswith("/bin/activate"), words
    elif head == "pip":
        assert rest[:1] == ["install"], f"pip {rest[:1]}: only `pip install` is checked"
        _check_pip(rest[1:])
    elif head == "pytest":
        takes_value = {"-n", "-k", "-m", "-p", "--numprocesses", "--dist"}
        for previous, arg in zip(["", *rest], rest, strict=False):
            if not arg.startswith("-") and previous not in takes_value:
                assert (ROOT / arg.split("::")[0]).exists(), f"no test path {arg}"
    elif head == "lora-param-mnist":
        _check_mnist(rest)
    elif head == "mkdocs":
        assert rest[:1] in (["serve"], ["build"]), words
    elif head == "python" and rest and rest[0].endswith(".py"):
        assert (ROOT / rest[0]).is_file(), f"no script {rest[0]}"
    elif head in ("git", "cd", "ruff", "mypy", "twine"):
        return
    else:
        raise AssertionError(f"`{head}` is not a command these checks know; run it or mark it")


def _commands(code: str) -> Iterator[list[str]]:
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def test_the_shell_checks_catch_what_would_fail() -> None:
    for words in (
        ["torchrun", "--nproc-per-node", "2", "train.py"],
        ["pip", "install", ".[nope]"],
        ["pip", "install", "leftpad"],
        ["lora-param-mnist", "--rank", "0"],
        ["python", "benchmarks/no_such_script.py"],
        ["mkdocs", "deploy"],
    ):
        with pytest.raises(AssertionError):
            _check_command(words)
    _check_command(["pip", "install", ".[mnist,plot]"])
    assert list(_commands("a && b --x # c\nd \\\n  --y; e\n")) == [
        ["a"],
        ["b", "--x"],
        ["d", "--y"],
        ["e"],
    ]


SHELL = [b for b in ALL if b.lang in CHECK and b.skip is None]


@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_shell_block(block: Block) -> None:
    commands = list(_commands(block.code))
    assert commands, f"{block.where}: an empty shell block"
    for words in commands:
        try:
            _check_command(words)
        except AssertionError as e:
            raise AssertionError(f"{block.where}: {shlex.join(words)}\n{e}") from None


# --------------------------------------------------------------------------- python blocks

#: Hub ids the examples use, and the tiny random model saved under each (see the module docs).
HUB: dict[str, Callable[[Path], None]] = {}


def _hub(repo: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        HUB[repo] = build
        return build

    return register


def _llama_config():
    import transformers

    # Every projection at least 32 wide: bitsandbytes' CPU 4-bit kernel needs it.
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


@_hub("meta-llama/Llama-3.2-1B")
def _llama(folder: Path) -> None:
    import transformers

    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(folder)


@_hub("mistralai/Mixtral-8x7B-v0.1")
def _mixtral(folder: Path) -> None:
    import transformers

    config = transformers.MixtralConfig(
        num_local_experts=4,
        num_experts_per_tok=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.MixtralForCausalLM(config).save_pretrained(folder)


@_hub("openai-community/gpt2")
def _gpt2(folder: Path) -> None:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


@_hub("google-bert/bert-base-uncased")
def _bert(folder: Path) -> None:
    import transformers

    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)


@_hub("stable-diffusion-v1-5/stable-diffusion-v1-5")
def _stable_diffusion(folder: Path) -> None:
    import diffusers
    import transformers

    diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        sample_size=8,
        attention_head_dim=8,
    ).save_pretrained(folder / "unet")
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def _kohya_file(path: Path, seed: int) -> None:
    """A Stable Diffusion LoRA for the tiny models above, as kohya-ss writes them: UNet
    attention (``lora_unet_*``) and text-encoder attention (``lora_te_*``) entries."""
    import diffusers
    import transformers
    from safetensors.torch import load_file, save_file

    from lora_param import add_lora, export_kohya, iter_lora

    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    unet = diffusers.UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    text_encoder = transformers.CLIPTextModel.from_pretrained(repo, subfolder="text_encoder")
    add_lora(unet, ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"], rank=4)
    add_lora(text_encoder, ["*.q_proj", "*.v_proj"], rank=4)
    g = torch.Generator().manual_seed(seed)
    entries: dict[str, torch.Tensor] = {}
    for model, prefix in ((unet, "lora_unet"), (text_encoder, "lora_te")):
        with torch.no_grad():
            for *_, p in iter_lora(model):
                p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.1)
        export_kohya(model, path, prefix=prefix)
        entries.update(load_file(path))
    save_file(entries, path)


#: Files the examples use as if the reader had downloaded them, made in the working folder.
FILES: dict[str, Callable[[Path], None]] = {
    "style_a.safetensors": lambda p: _kohya_file(p, 1),
    "style_b.safetensors": lambda p: _kohya_file(p, 2),
}


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(
        f">{data.dim()}I", *data.shape
    )
    path.write_bytes(header + data.contiguous().numpy().tobytes())


def _synthetic_mnist(root: Path, train: int = 3_000, test: int = 1_000) -> None:
    """MNIST's four IDX files with random images, fewer of them: each digit is a bright bar at
    its own row."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        rows = 2 + 2 * labels
        images[torch.arange(n), rows, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An offline Hugging Face cache holding a tiny random checkpoint under each id of HUB."""
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf") / "hub"
    revision = "0" * 40
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for repo, build in HUB.items():
            folder = cache / f"models--{repo.replace('/', '--')}"
            torch.manual_seed(0)
            try:
                build(folder / "snapshots" / revision)
            except ModuleNotFoundError:  # diffusers for the Stable Diffusion entry
                continue  # the pages that use it skip (optional_dependencies)
            (folder / "refs").mkdir(parents=True)
            (folder / "refs" / "main").write_text(revision)
        yield cache


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    _synthetic_mnist(root)
    return root


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    compile_ = torch.compile

    def eager(model=None, **kwargs):
        kwargs["backend"] = "eager"
        return compile_(model, **kwargs) if model is not None else compile_(**kwargs)

    monkeypatch.setattr(torch, "compile", eager)


def _python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in RUN and b.skip is None for b in blocks(p))]


OPTIONAL = {"transformers", "diffusers", "peft", "torchvision", "safetensors", "matplotlib"}
# (accelerate: transformers.Trainer needs it; bitsandbytes: 4-bit loading)
#: What else a page needs when its code mentions these (beyond what it imports).
IMPLIED = {
    "BitsAndBytesConfig": ("bitsandbytes",),
    "LoRATrainer": ("accelerate",),
    "lora_param.mnist": ("torchvision", "matplotlib"),
    "_peft(": ("safetensors",),
    "_kohya(": ("safetensors",),
    ".safetensors": ("safetensors", "diffusers", "transformers"),
}


def optional_dependencies(code: str) -> set[str]:
    """The optional packages a page's examples need: they skip, as any test, without them."""
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, re.M))
    needed = imported & OPTIONAL
    for mention, packages in IMPLIED.items():
        if mention in code:
            needed.update(packages)
    return needed


@pytest.mark.parametrize("page", _python_pages(), ids=_page_id)
def test_python_examples(
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    eager_compile: None,
) -> None:
    code = [b for b in blocks(page) if b.lang in RUN and b.skip is None]
    text = "".join(b.code for b in code)
    needed = optional_dependencies(text)
    for package in sorted(needed):
        pytest.importorskip(package)
    if needed & {"transformers", "diffusers"}:
        request.getfixturevalue("hub_cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example"])
    if "lora_param.mnist" in text:
        mnist_root = request.getfixturevalue("mnist_root")
        (tmp_path / "data").symlink_to(mnist_root, target_is_directory=True)
    for name, make in FILES.items():
        if name in text:
            make(tmp_path / name)
    # The blocks run as a script would: in a module that is __main__ (classes they define
    # pickle, as torch.save needs).
    script = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", script)
    namespace = script.__dict__
    for block in code:
        # Line numbers in tracebacks point into the page.
        source = "\n" * (block.line - 1) + block.code
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(source, str(block.page), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the example at {block.where} failed: {e!r}") from e
        printed = "\n".join(line.rstrip() for line in out.getvalue().splitlines())
        for expected in shown_output(block.code):
            pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
            assert re.search(pattern, printed, re.S), (
                f"{block.where}: the page shows\n{expected}\nbut the example printed\n{printed}"
            )


def shown_output(code: str) -> list[str]:
    """What a block says it prints: the ``# `` comment lines right after a ``print(...)`` line
    (``...`` stands for anything)."""
    shown: list[str] = []
    lines = code.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        comments = []
        for following in lines[i + 1 :]:
            if not following.startswith("# "):
                break
            comments.append(following[2:].rstrip())
        if comments:
            shown.append("\n".join(comments))
    return shown


# --------------------------------------------------------------------------- the API reference


def test_api_reference_covers_every_public_name_by_its_public_path() -> None:
    """``::: lora_param.<name>`` for each name in ``__all__`` (public paths only, so that
    moving a module does not break the build)."""
    import lora_param

    directives = [
        m[1]
        for page in (ROOT / "docs" / "api").glob("*.md")
        for m in re.finditer(r"^:::\s+(\S+)", page.read_text(encoding="utf-8"), re.M)
    ]
    assert all(re.fullmatch(r"lora_param\.\w+", d) for d in directives), directives
    documented = {d.split(".", 1)[1] for d in directives}
    # LoRATrainer is public but lazy (not in __all__, so that a star import needs no
    # transformers); it is documented all the same.
    public = {*lora_param.__all__, "LoRATrainer"}
    assert documented == public, public ^ documented
