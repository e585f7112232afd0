"""Offline demo checkpoints: a real tokenizer plus small random-weight causal LMs.

This module owns everything needed to produce, without network access, a tiny Hugging Face
checkpoint that the engine can load end to end in smoke tests and demos:

* ``build_tokenizer`` trains a byte-level BPE tokenizer on a corpus embedded below and wraps it
  as a ``transformers`` fast tokenizer with a ChatML chat template.
* ``make_checkpoint`` writes a random-weight checkpoint (safetensors, float32) for one of the
  supported Llama-family architectures, with that tokenizer and a generation config beside it.
* ``demo_model_path`` materialises the canonical demo checkpoint in a cache directory.

Invariants:

* Everything is deterministic: the same arguments give the same vocabulary, the same merges and
  byte-identical weight files, in any process. Randomness only comes from a ``torch.Generator``
  seeded by the caller, and the caller's global RNG state is left untouched.
* Special tokens have fixed ids: ``<|endoftext|>`` = 0 (padding), ``<|im_start|>`` = 1,
  ``<|im_end|>`` = 2 (end of turn, the model's EOS). There is no BOS token.
* ``demo_model_path`` never exposes a half-written directory: a checkpoint is built in a private
  temporary directory, marked complete, and then renamed into place in one step.

The weights are random, so generated text is noise; they are scaled up relative to the usual
initialisation so that logits have spread and greedy decoding does not collapse onto one token.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_MODEL_VERSION",
    "ENDOFTEXT_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "SUPPORTED_ARCHITECTURES",
    "build_tokenizer",
    "default_cache_dir",
    "demo_model_path",
    "make_checkpoint",
]

# Bump whenever anything that changes the demo checkpoint's bytes changes (corpus, trainer
# settings, default dims, initialisation): the cache directory name includes it, so a stale
# cached copy is never mistaken for the current one.
DEMO_MODEL_VERSION: int = 1

ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: the BPE trainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

TOKENIZER_VOCAB_SIZE = 1024

# Pre-tokenizer split (the GPT-4 / Qwen2 style pattern): contractions, words with one leading
# non-letter, single digits, punctuation runs, newlines and other whitespace.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. Message content may be a plain string or a list of OpenAI-style parts, of which only
# the text parts are rendered (the demo model has no other modality).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Training text for the tokenizer. Plain prose so that merges look like a real English
# tokenizer's, plus accented Latin, CJK, Cyrillic, Greek and emoji (some with modifiers and
# joiners) so that the vocabulary has multi-byte characters both as whole tokens and split
# across several byte-level tokens.
_CORPUS = """\
The lighthouse on the northern cape was built of grey stone, and for most of its life it was
kept by a single family. Every evening the keeper climbed the one hundred and twelve steps, wound
the clockwork that turned the lens, and trimmed the wick of the great lamp. In the morning he
wrote a line in the log: the wind, the state of the sea, the ships that had passed in the night.
Most entries were short. "Wind from the west, light rain, two fishing boats." Some were longer,
written on nights when the storm pressed against the windows and the whole tower seemed to hum.

His daughter learned to read from that log. She knew the names of the winds before she knew the
names of the neighbours, and she could tell a trawler from a ferry by the pattern of its lights.
When she was older she went to the city to study engineering, and she came back with a plan to
replace the clockwork with an electric motor. Her father listened, nodded, and said that the old
machine had never once failed. She installed the motor anyway, and kept the clockwork beside it,
oiled and ready, because she had learned from him that a light at sea is a promise.

A good loaf of bread needs only four things: flour, water, salt and time. Mix the flour and the
water and let them rest for half an hour, so that the flour can drink. Then add the salt and a
little of yesterday's dough, fold it a few times, and leave it covered in a warm corner of the
kitchen. Over the next hours the dough will rise slowly; fold it again whenever you pass by.
In the evening, shape it into a round, dust it with flour, and let it rest overnight in a cool
place. Bake it in the morning in a very hot oven, with a tray of water underneath for steam,
until the crust is dark and the loaf sounds hollow when you knock on the bottom.

The small café on the corner of the square opens at seven. Its owner, a retired teacher named
Hélène, serves strong coffee, warm croissants and a crème brûlée that people cross the city to
taste. She says the secret is patience and good eggs, which is a naïve answer, but perhaps it is
also the true one. On Sundays the regulars argue about football and politics, and on Mondays they
pretend that nothing was said. Visitors from abroad sometimes ask for the menu in English; she
answers in French, slowly and kindly, until they understand. Über alles liebt sie die Ruhe am
frühen Morgen, wenn die Straße noch leer ist und nur der Bäcker schon arbeitet.

Learning a new language changes how you listen. At first every sentence is a wall of sound; then
single words begin to stand out, like stones in a river, and one day you notice that you have
understood a whole conversation without trying. 日本語を勉強しています。毎朝、駅まで歩きながら新しい
言葉を覚えます。東京の電車はとても静かで、時間通りに来ます。我喜欢学习中文，因为每个汉字都有自己的故事。
Привет, мир! Это короткое предложение на русском языке. Καλημέρα, κόσμε. Ο ήλιος λάμπει σήμερα.
Many learners keep a notebook of phrases they like, and read it again on the train home.

Computers store text as numbers. Each character is given a code point, and the code point is
written as one or more bytes. Plain letters like a, b and c need a single byte, while é and ü need
two, the characters of 日本 need three, and an emoji such as 🚀 or 🎉 needs four. Some symbols are
built from several code points joined together: a thumbs up with a skin tone 👍🏽, a family 👩‍👩‍👧,
or a flag 🇯🇵. A tokenizer that works on bytes can represent all of them, even ones it never saw
during training, by falling back to the individual bytes. 😀 😂 🙂 ❤️ ✨ 🌍 🌧️ ☕ 🍞 🚲

The river runs past the old mill, under three bridges, and out into the marshes where the herons
wait. In spring the water is high and brown with melted snow; in late summer it is so low that
children walk across it on the stones. Nobody remembers when the mill last turned. The wheel is
still there, green with moss, and the millstones lie in the grass beside the path, where hikers
sit on them to eat their sandwiches and look at the water.

Here is a short list of things to pack for a weekend in the mountains: a warm jacket, a hat, two
pairs of socks, a map, a torch with spare batteries, water, bread, cheese, apples and chocolate.
Check the weather before you leave, tell someone where you are going, and turn back if the clouds
come down. The mountain will still be there next year. It is 2024 and the trail is 12.5 km long,
with 850 m of climbing; allow about five hours, or six if you stop often to look at the view.

def greet(name: str) -> str:
    # Say hello to someone by name.
    return f"Hello, {name}!"

for i in range(3):
    print(greet("world"), i)

Questions are often more useful than answers. Why does the sky look blue? Why do cats purr? How
does a bird find its way home across an ocean? Each question opens a door, and behind every door
there are more doors. The people who seem to know the most are usually the ones who kept asking,
long after everyone else had stopped. So ask, listen, write things down, and ask again.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the demo byte-level BPE tokenizer and wrap it for ``transformers``.

    Deterministic: two calls (in any processes) give the same vocabulary and merges. Any string
    can be encoded, and decoding gives back its NFC normal form.
    """
    tokenizer = Tokenizer(models.BPE())
    # The pipeline is exactly the one transformers' Qwen2Tokenizer builds (NFC, Qwen's split
    # regex, byte-level symbols without a prefix space). AutoTokenizer loads a ``qwen2``
    # checkpoint with that class whatever tokenizer_config.json says and rebuilds the pipeline
    # from vocab and merges; matching it keeps every architecture's checkpoint tokenizing
    # identically to this object (a test checks).
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Keeps offsets pointing at the original characters rather than the byte-level symbols.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so any UTF-8 input is representable, including
        # characters that never occur in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = [p for p in _CORPUS.split("\n\n") if p.strip()]
    tokenizer.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if wrapped.convert_tokens_to_ids(token) != token_id:  # guards the documented ids
            raise RuntimeError(f"special token {token!r} did not get id {token_id}")
    return wrapped


# Architecture name -> (config class, model class). All four share the Llama layout (RMSNorm,
# rotary embeddings, gated MLP, grouped-query attention) and differ in details the engine's
# model implementations must honour (attention biases in Qwen2, q/k norms in Qwen3, ...).
SUPPORTED_ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "MistralForCausalLM": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "Qwen3ForCausalLM": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

_DEFAULT_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    # Explicit so all architectures agree (their defaults differ); override to test tying.
    "tie_word_embeddings": False,
}

# Standard deviation of the random weights. HF's usual 0.02 gives near-uniform logits at these
# widths, and greedy decoding then repeats one token forever. At 0.1 a model with tied
# embeddings still mostly repeats its input token (the embedding dominates the residual stream
# and matches itself in the LM head). 0.2 makes the layers' contributions dominate and gives
# logits a spread of about 1.5-2.5: varied greedy text, and sampling that is not uniform.
_INIT_STD = 0.2


def make_checkpoint(
    path: Path,
    *,
    architecture: str = "LlamaForCausalLM",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight Hugging Face checkpoint to ``path`` and return ``path``.

    ``config_overrides`` go to the architecture's config class after the small defaults (for
    example ``tie_word_embeddings``, ``head_dim``, ``rope_scaling``, ``attention_bias``,
    ``sliding_window``). ``max_shard_size`` (e.g. ``"20KB"``) splits the weights into several
    safetensors files with an index. Weights depend only on ``seed`` and the config.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"unsupported architecture {architecture!r}; expected one of {supported}")
    config_cls, model_cls = SUPPORTED_ARCHITECTURES[architecture]
    if tokenizer is None:
        tokenizer = build_tokenizer()

    eos_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext_id

    config_kwargs: dict[str, Any] = {
        **_DEFAULT_DIMS,
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        **config_overrides,
    }
    if "head_dim" not in config_overrides:
        # Qwen3's and Mistral's configs default head_dim to 128 regardless of hidden_size.
        config_kwargs["head_dim"] = (
            config_kwargs["hidden_size"] // config_kwargs["num_attention_heads"]
        )
    config = config_cls(**config_kwargs)
    config.architectures = [architecture]

    # fork_rng: building the module draws from the global RNG (HF's own init), which must
    # neither depend on nor disturb the caller's state; our init below replaces all of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        # <|im_end|> ends a chat turn; <|endoftext|> ends a raw completion.
        eos_token_id=[eos_id, endoftext_id],
        pad_token_id=pad_id,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def _init_weights(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every parameter deterministically from ``seed``.

    Matrices (projections, embeddings) and biases get N(0, _INIT_STD); norm scales get
    1 + N(0, _INIT_STD). HF would make biases zero and scales one, but then a model
    implementation that forgot a bias or a norm scale would still reproduce the reference
    outputs; random values make such a mistake visible. Parameters are visited in registration
    order, which the architecture fixes, so every tensor is reproducible from the seed.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # named_parameters() yields a tied embedding / LM head only once, so tying is preserved.
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * _INIT_STD
        if param.ndim == 1 and not name.endswith("bias"):
            noise += 1.0  # a norm's scale
        param.copy_(noise)


_COMPLETE_MARKER = ".complete"


def default_cache_dir() -> Path:
    """``$ENGINE_CACHE_DIR`` if set, else ``~/.cache/engine``."""
    env = os.environ.get("ENGINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engine"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Return the path of the demo Llama checkpoint, building it first if needed.

    Idempotent and safe to call from concurrent processes: the checkpoint is built in a
    temporary directory beside the target, marked complete, then renamed into place; a builder
    that loses the race discards its copy and uses the winner's (they are byte-identical).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"demo-llama-v{DEMO_MODEL_VERSION}"
    if (target / _COMPLETE_MARKER).is_file():
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        # mkdtemp makes the directory private (0700); the published cache should be as
        # readable as any other cache entry.
        staging.chmod(0o755)
        make_checkpoint(
            staging,
            architecture="LlamaForCausalLM",
            seed=0,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        (staging / _COMPLETE_MARKER).write_text(f"demo-llama v{DEMO_MODEL_VERSION}\n")
        _publish(staging, target)
    finally:
        # Present only if we lost the race or failed part-way.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``, tolerating other builders."""
    for _ in range(2):
        try:
            # Atomic on POSIX; fails if target exists and is non-empty.
            os.rename(staging, target)
            return
        except OSError:
            if (target / _COMPLETE_MARKER).is_file():
                return  # Another builder finished first; its copy is as good as ours.
            if not target.exists():
                continue  # It vanished between the rename and the check; try again.
            # An incomplete leftover that no atomic builder could have produced (for example
            # a hand-made or interrupted copy from a non-atomic tool): move it aside first so
            # that readers never see it change underneath them, then retry.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            with contextlib.suppress(OSError):
                os.rename(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
    if not (target / _COMPLETE_MARKER).is_file():
        raise RuntimeError(f"could not install the demo checkpoint at {target}")


def make_layer_truncated_checkpoint(source: Path, path: Path, num_layers: int) -> Path:
    """Writes a checkpoint made of `source`'s first `num_layers` decoder layers (with its
    embeddings, final norm and head, and its tokenizer files): a draft model for speculative
    decoding that shares most of the target's computation and exactly its vocabulary."""
    import json

    from safetensors.torch import load_file, save_file

    source, path = Path(source), Path(path)
    config = json.loads((source / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(
            f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}"
        )
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            parts = name.split(".")
            if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= num_layers:
                continue
            tensors[name] = tensor
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for file in source.iterdir():
        if file.suffix in (".json", ".jinja", ".txt", ".model") and file.name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy(file, path / file.name)
    return path
