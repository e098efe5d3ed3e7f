"""Build the default model that ships inside weir (`engine/default_model/`).

`weir serve` with no model argument serves this checkpoint, so a fresh checkout can stream text
without downloading anything. It is a demo, not a useful assistant: a 3.9M-parameter Llama trained
for about 20 minutes on two CPU cores. It writes English in the style of Python documentation and
answers simple "What does json.dumps do?" questions in the ChatML chat format.

Run from the repository root (CPU only; no network; deterministic for a given Python version):

    python -m tools.build_default_model --out engine/default_model

It takes about 21 minutes on 2 otherwise idle CPU cores (2000 training steps of ~0.6 s; the
corpus and tokenizer take under a minute), longer on a busy machine (38 minutes on a shared 2-core
box), and writes an ordinary
Hugging Face folder: config.json (LlamaForCausalLM), generation_config.json, model.safetensors
(bfloat16, under 8 MB), tokenizer.json + tokenizer_config.json (with the chat template) and a
README.md recording the data, the command, the parameter count, the size and the final loss.
`--steps 50` gives a quick smoke build (minutes, unreadable output).

Pipeline:
  1. Corpus: the docstrings of the Python standard library (every public stdlib module and its
     submodules, walked with `pkgutil` in sorted order, test/GUI/platform-specific modules
     skipped), the docstrings and comment blocks of the stdlib's .py source (parsed, not
     imported), the language-reference topics that `pydoc`/`help()` shows (`pydoc_data.topics`),
     plus chat transcripts made from them ("What does json.dumps do?" -> the docstring's first
     paragraph) and a few canned small-talk exchanges. Exact duplicates are dropped; code-heavy
     paragraphs (doctests, signatures) are filtered out so the model learns prose.
  2. Tokenizer: byte-level BPE trained with `tokenizers` on that corpus (vocab 4096), special
     tokens <unk> <s> </s> <|im_start|> <|im_end|>, ChatML chat template.
  3. Model: transformers' LlamaForCausalLM (tied embeddings, GQA) trained from a fixed seed with
     AdamW, linear warmup and cosine decay, on 256-token windows that start at document
     boundaries, documents separated by </s>. 2% of the documents are held out for validation.
  4. Save in bfloat16 and check that the saved checkpoint reloads and generates.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import random
import re
import sys
import sysconfig
import time
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path

# Tokenizer and chat format.
UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, IM_START, IM_END]  # ids 0..4
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stdlib modules not imported: side effects on import (GUI, browser, printing), tests, demos,
# platform-specific or deprecated packages, and codec tables with no prose.
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "venv", "pydoc_data", "encodings", "distutils", "msilib", "winreg", "winsound",
    "msvcrt", "nt", "_winapi", "__main__", "__phello__", "__hello__", "xxsubtype",
}  # fmt: skip
SKIP_SUBMODULE_PARTS = {"test", "tests", "__main__", "idle_test"}

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant that answers questions about Python.",
    "You are a concise assistant.",
]
SMALL_TALK = [
    (
        ["Hello", "Hi", "Hello!", "Hi there", "Hey", "Good morning", "hello"],
        "Hello! I am the small default model that ships with weir. I was trained on the documentation "
        "of the Python standard library, so ask me what a Python module or function does.",
    ),
    (
        ["Who are you?", "What are you?", "What model are you?", "Tell me about yourself."],
        "I am a tiny Llama-style language model built into weir so that it can serve something "
        "without a download. I know a little about the Python standard library. For real work, "
        "start weir with a larger model.",
    ),
    (
        ["What can you do?", "How can you help me?", "What do you know?"],
        "I can answer simple questions about Python modules, classes and functions, such as "
        '"What does json.dumps do?" or "What is the os module for?". I am very small, so my '
        "answers are short and sometimes wrong.",
    ),
    (
        ["How are you?", "How are you doing?", "how are you"],
        "I am fine, thank you! Ask me what a Python module or function does.",
    ),
    (
        ["Thank you", "Thanks!", "thanks", "Thank you very much."],
        "You are welcome!",
    ),
    (
        ["Goodbye", "Bye!", "See you later."],
        "Goodbye!",
    ),
    (
        ["What is Python?", "Tell me about Python."],
        "Python is a programming language with a large standard library of modules for files, "
        "text, networking, data formats and much more.",
    ),
]
SMALL_TALK_REPEATS = 30  # each answer appears this many times in the corpus, so it is learned by heart


@dataclass
class ModelShape:
    """The model's dimensions, chosen so the bfloat16 checkpoint stays under 8 MB with ~20 minutes of
    CPU training: 3.94M parameters, of which 1.05M are the (tied) token embeddings."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 496
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


# ----------------------------------------------------------------------------------------------
# 1. Corpus
# ----------------------------------------------------------------------------------------------


def stdlib_module_names() -> list[str]:
    """Public stdlib module and submodule names, sorted, minus SKIP_MODULES and test packages."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        mod = _quiet_import(top)
        if mod is None:
            continue
        names.add(top)
        for info in pkgutil.walk_packages(
            getattr(mod, "__path__", []) or [], prefix=top + ".", onerror=lambda _: None
        ):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in SKIP_SUBMODULE_PARTS for p in parts[1:]):
                continue
            names.add(info.name)
    return sorted(names)


def _quiet_import(name: str):
    """Import a module with its warnings and any printing suppressed; None if it cannot be imported."""
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def clean_doc(doc: str | None) -> str:
    """Keep the prose paragraphs of a docstring: drop doctests, signatures and code-like blocks."""
    if not doc:
        return ""
    kept = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        para = para.strip()
        if not para or ">>>" in para or para.startswith(("..", "::", "$ ")):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters / len(para) < 0.85 or not re.search(r"[a-z]{3} [a-z]{2,} ", para):
            continue
        # Reflow hard-wrapped prose to single lines; keep genuinely indented blocks (lists) as they are.
        lines = para.splitlines()
        if all(not ln.startswith(" ") for ln in lines):
            para = " ".join(ln.strip() for ln in lines)
        kept.append(para)
    return "\n\n".join(kept)


def first_paragraph(doc: str, max_chars: int = 400) -> str | None:
    """The first paragraph of a cleaned docstring if it reads like a sentence, else None."""
    para = doc.split("\n\n", 1)[0].strip()
    if not (20 <= len(para) <= max_chars) or "\n" in para:
        return None
    if not (para[0].isupper() and para.endswith(".")):
        return None
    return para


def collect_documented_objects() -> list[tuple[str, str, str]]:
    """(qualified name, kind, cleaned docstring) for stdlib modules, their public classes and functions,
    and the methods of those classes. Only objects defined in the module itself (no re-exports)."""
    out: list[tuple[str, str, str]] = []
    for modname in stdlib_module_names():
        mod = _quiet_import(modname)
        if mod is None:
            continue
        out.append((modname, "module", clean_doc(mod.__doc__)))
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isclass(obj):
                out.append((f"{modname}.{attr}", "class", clean_doc(obj.__doc__)))
                for mname, member in sorted(vars(obj).items()):
                    if mname.startswith("_"):
                        continue
                    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if not _from_stdlib(member.fget if isinstance(member, property) else func):
                        continue  # e.g. transformers adds warning_once() to logging.Logger
                    if inspect.isroutine(func) or isinstance(member, property):
                        kind = "property" if isinstance(member, property) else "method"
                        out.append(
                            (f"{modname}.{attr}.{mname}", kind, clean_doc(getattr(func, "__doc__", None)))
                        )
            elif inspect.isroutine(obj):
                out.append((f"{modname}.{attr}", "function", clean_doc(obj.__doc__)))
    return [(name, kind, doc) for name, kind, doc in out if len(doc) >= 40]


def source_texts() -> list[str]:
    """Docstrings and comment blocks from the stdlib's Python source, found by parsing (no imports, so
    private, GUI and platform-specific modules count too). Test packages are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(
            part in SKIP_SUBMODULE_PARTS
            or part in ("test", "site-packages", "__pycache__")
            or part.startswith("config-")
            for part in p.relative_to(root).parts
        )
    )
    out: list[str] = []
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append(clean_doc(ast.get_docstring(node, clean=False)))
        # Runs of consecutive comment lines, joined into one paragraph.
        block: list[str] = []
        with contextlib.suppress(tokenize.TokenError, SyntaxError):
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    block.append(tok.string.lstrip("#!").strip())
                elif tok.type != tokenize.NL and block:
                    out.append(clean_doc(" ".join(b for b in block if b)))
                    block = []
    return [t for t in out if len(t) >= 60]


def _from_stdlib(obj) -> bool:
    """False for a function that a third-party package attached to a stdlib class."""
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0] in sys.stdlib_module_names


def reference_topics() -> list[tuple[str, str]]:
    """(title, text) of the language-reference topics that `help()` shows, from `pydoc_data.topics`."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key].strip()
        lines = text.splitlines()
        title = lines[0].strip() if lines else key
        if len(lines) > 1 and set(lines[1].strip()) <= set("*=-~^"):
            text = "\n".join(lines[2:]).strip()
        else:
            title = key
        body = clean_doc(text)
        if len(body) >= 200:
            out.append((title.replace('"', ""), body))
    return out


def chat(messages: list[tuple[str, str]]) -> str:
    """Render (role, content) messages with the ChatML template (same text as CHAT_TEMPLATE)."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def build_corpus(seed: int) -> list[str]:
    """All training documents, deduplicated, in a deterministic shuffled order."""
    rng = random.Random(seed)
    docs: list[str] = []
    qa: list[tuple[str, str]] = []  # (question, answer) pairs for chat transcripts
    seen: set[str] = set()

    for name, kind, doc in collect_documented_objects():
        if doc in seen:
            continue
        seen.add(doc)
        docs.append(f"{name}\n\n{doc}" if rng.random() < 0.5 else doc)
        answer = first_paragraph(doc)
        if answer is None:
            continue
        if kind == "module":
            questions = [
                f"What is the {name} module for?",
                f"Tell me about the {name} module.",
                f"What is {name}?",
            ]
        elif kind == "class":
            questions = [f"What is {name}?", f"What is the {name} class?", f"Explain {name}."]
        else:
            questions = [
                f"What does {name} do?",
                f"What does {name}() do?",
                f"Explain {name}.",
                f"What is {name}?",
            ]
        qa += [(question, answer) for question in rng.sample(questions, 2)]
    for text in source_texts():
        if text not in seen:
            seen.add(text)
            docs.append(text)
    for title, body in reference_topics():
        docs.append(f"{title}\n\n{body}")
        answer = first_paragraph(body, max_chars=600)
        if answer:
            questions = [f"Explain {title} in Python.", f"What is {title}?", f"Tell me about {title}."]
            qa += [(question, answer) for question in rng.sample(questions, 2)]
    for questions, answer in SMALL_TALK:
        qa += [(rng.choice(questions), answer) for _ in range(SMALL_TALK_REPEATS)]

    # Chat transcripts: mostly one exchange, sometimes with a system prompt, sometimes two exchanges.
    rng.shuffle(qa)
    i = 0
    while i < len(qa):
        messages = [("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < 0.2 else []
        turns = 2 if rng.random() < 0.15 and i + 1 < len(qa) else 1
        for question, answer in qa[i : i + turns]:
            messages += [("user", question), ("assistant", answer)]
        docs.append(chat(messages))
        i += turns
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE fast tokenizer with the ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=IM_END,  # chat replies end here; </s> (document end) is also in generation_config
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=ModelShape.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------


def make_model(shape: ModelShape, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(IM_END),
        pad_token_id=SPECIAL_TOKENS.index(EOS),
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Windows:
    """Training/validation batches: `seq_len`-token windows of the document stream, each starting at a
    document boundary (so the model sees prompts at position 0 as it will at inference)."""

    def __init__(self, token_docs: list[list[int]], seq_len: int, eos_id: int):
        import torch

        stream, starts = [], []
        for ids in token_docs:
            starts.append(len(stream))
            stream.extend(ids)
            stream.append(eos_id)
        stream.extend([eos_id] * seq_len)  # so a window at the last start is full length
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.starts = torch.tensor(starts, dtype=torch.long)
        self.seq_len = seq_len

    def batch(self, gen, batch_size: int):
        import torch

        idx = self.starts[torch.randint(len(self.starts), (batch_size,), generator=gen)]
        offsets = idx[:, None] + torch.arange(self.seq_len)[None, :]
        return self.stream[offsets]

    @property
    def num_tokens(self) -> int:
        return len(self.stream) - self.seq_len


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, batches) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model, train_data: Windows, val_batches, args, log) -> dict:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    t0 = time.time()
    smoothed = None
    val_loss = float("nan")
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, floor=0.1)
        batch = train_data.batch(gen, args.batch_size)
        # transformers shifts labels by one inside the loss, so labels are the inputs themselves.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        last = step == args.steps - 1
        if step % 50 == 0 or last:
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            log(f"step {step:5d}/{args.steps}  loss {smoothed:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{elapsed / 60:5.1f} min elapsed, ~{eta / 60:.1f} min left")  # fmt: skip
        if (step > 0 and step % args.eval_every == 0) or last:
            val_loss = evaluate(model, val_batches)
            log(f"step {step:5d}  val loss {val_loss:.3f}")
    return {
        "train_loss": smoothed,
        "val_loss": val_loss,
        "minutes": (time.time() - t0) / 60,
        "tokens": args.steps * args.batch_size * args.seq_len,
    }


# ----------------------------------------------------------------------------------------------
# 4. Save and check
# ----------------------------------------------------------------------------------------------

GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "max_new_tokens": 256,
}


def save(model, tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[IM_END], ids[EOS]],
        pad_token_id=ids[EOS],
        **GENERATION_DEFAULTS,
    ).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_portable(out)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the files must be readable by any user (containers)


def make_portable(out: Path) -> None:
    """Rewrite what transformers 5 saved so transformers 4.x (weir supports >= 4.45) reads it too:
    tokenizer_config.json names the classic fast-tokenizer class, lists the chat-format tokens as
    `additional_special_tokens` and carries the chat template itself (no chat_template.jinja);
    config.json also states rope_theta and torch_dtype at the top level."""
    tok_file, cfg_file = out / "tokenizer_config.json", out / "config.json"
    tok_cfg = json.loads(tok_file.read_text())
    tok_cfg.pop("backend", None)
    tok_cfg.pop("extra_special_tokens", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["additional_special_tokens"] = [IM_START, IM_END]
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for a Llama
    tok_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)

    cfg = json.loads(cfg_file.read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", ModelShape.rope_theta))
    cfg.setdefault("torch_dtype", cfg.get("dtype", "bfloat16"))
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def sample_outputs(out: Path) -> list[tuple[str, str]]:
    """Reload the saved folder and generate from a few prompts (greedy), as a smoke test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompts = [
        "Return the number of",
        "The json module",
        tok.apply_chat_template(
            [{"role": "user", "content": "What does json.dumps do?"}],
            tokenize=False,
            add_generation_prompt=True,
        ),  # fmt: skip
        tok.apply_chat_template(
            [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
        ),
    ]
    results = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=48, do_sample=False, repetition_penalty=1.1)
        results.append((prompt, tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)))
    return results


def write_readme(out: Path, args, stats: dict) -> None:
    size = (out / "model.safetensors").stat().st_size
    samples = "\n\n".join(
        f"Prompt:\n```\n{p}\n```\nGreedy continuation:\n```\n{c.strip()}\n```" for p, c in stats["samples"]
    )
    text = f"""\
# weir default model

A tiny Llama-architecture language model that ships inside weir so that `weir serve` works with no
model argument and no download. It is a demo of the serving stack, not a useful assistant: it
writes English in the style of Python documentation and answers simple questions such as
"What does json.dumps do?" in the ChatML chat format, often wrongly.

Built by `tools/build_default_model.py` (deterministic for a given Python version and seed):

```
{stats["command"]}
```

| | |
|---|---|
| Architecture | LlamaForCausalLM, {args.shape.num_hidden_layers} layers, hidden {args.shape.hidden_size}, \
{args.shape.num_attention_heads} heads / {args.shape.num_key_value_heads} KV heads, MLP {args.shape.intermediate_size}, \
tied embeddings, RoPE theta {args.shape.rope_theta:g}, context {args.shape.max_position_embeddings} |
| Parameters | {stats["params"]:,} ({stats["params"] / 1e6:.2f}M) |
| Weights | model.safetensors, bfloat16, {size:,} bytes ({size / 1e6:.2f} MB) |
| Tokenizer | byte-level BPE, {stats["vocab"]} tokens, special tokens {", ".join(SPECIAL_TOKENS)} |
| Chat template | ChatML: `<|im_start|>role\\n...<|im_end|>\\n`; generation prompt `<|im_start|>assistant\\n` |
| Stop tokens | `<|im_end|>` (end of a chat reply) and `</s>` (end of a document) |
| Training data | {stats["num_docs"]:,} documents, {stats["corpus_tokens"]:,} tokens: see below |
| Training | {args.steps} steps x {args.batch_size} x {args.seq_len} tokens = {stats["tokens"]:,} tokens, \
AdamW (peak lr {args.lr:g}, betas 0.9/0.95, weight decay 0.1), {args.warmup} warmup steps, cosine decay to 10%, \
seed {args.seed}, float32 on CPU ({args.threads} threads), {stats["minutes"]:.1f} minutes |
| Final loss | train {stats["train_loss"]:.3f} (smoothed), validation {stats["val_loss"]:.3f} \
(bfloat16 reload: {stats["val_loss_bf16"]:.3f}) |
| Built with | Python {sys.version.split()[0]}, torch {stats["torch"]}, transformers {stats["transformers"]}, \
tokenizers {stats["tokenizers"]} |

## Data

All offline, from the Python {sys.version_info.major}.{sys.version_info.minor} standard library of the build machine:

- the docstrings of every public standard-library module and submodule (walked with `pkgutil` in
  sorted order; tests, GUI, demo and platform-specific modules skipped), of their public classes and
  functions and of those classes' methods; exact duplicates dropped, doctest and code-like
  paragraphs removed;
- the docstrings and comment blocks found by parsing the standard library's .py source (test
  packages skipped), also deduplicated;
- the language-reference topics that `help()` shows (`pydoc_data.topics`);
- chat transcripts made from the two: "What does json.dumps do?" answered with the first
  paragraph of its docstring, sometimes after a system prompt or as a two-turn conversation;
- a few canned small-talk exchanges ("Hello", "Who are you?").

2% of the documents are held out for the validation loss.

## Samples

{samples}

## License

The weights and tokenizer are derived from the Python documentation (PSF License) by weir's build
script; they are distributed with weir under its license.
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.build_default_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "engine" / "default_model"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    args.shape = ModelShape()

    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f}m] {msg}", flush=True)

    # Before torch and transformers are imported: they patch stdlib objects (torch wraps
    # inspect.getfile), which would change the corpus and so the whole build.
    log("collecting the corpus from the standard library")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # reading docs of deprecated aliases warns
        docs = build_corpus(args.seed)

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    n_val = max(1, len(docs) // 50)
    log(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters; {n_val:,} held out")
    log(f"corpus sha256 {hashlib.sha256(chr(0).join(docs).encode()).hexdigest()[:16]}")

    tokenizer = train_tokenizer(docs, args.shape.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    token_docs = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    train_data = Windows(token_docs[n_val:], args.seq_len, eos_id)
    val_data = Windows(token_docs[:n_val], args.seq_len, eos_id)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [val_data.batch(val_gen, args.batch_size) for _ in range(8)]
    corpus_tokens = train_data.num_tokens + val_data.num_tokens
    log(f"{corpus_tokens:,} tokens ({sum(map(len, docs)) / corpus_tokens:.2f} characters per token)")

    model = make_model(args.shape, args.seed)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params:,} parameters; training {args.steps} steps")
    stats = train(model, train_data, val_batches, args, log)

    save(model, tokenizer, args.out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    stats["val_loss_bf16"] = evaluate(reloaded, val_batches)
    log(f"saved to {args.out}; validation loss after the bfloat16 round trip {stats['val_loss_bf16']:.3f}")
    stats["samples"] = sample_outputs(args.out)
    for prompt, completion in stats["samples"]:
        log(f"sample: {prompt!r} -> {completion!r}")
    defaults = ["--out", "engine/default_model"] if argv is None else []
    given = sys.argv[1:] if argv is None else argv
    stats.update(
        command=" ".join(["python -m tools.build_default_model", *(given or defaults)]),
        params=params,
        vocab=len(tokenizer),
        num_docs=len(docs),
        corpus_tokens=corpus_tokens,
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )
    write_readme(args.out, args, stats)
    log(f"done in {(time.time() - t_start) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
