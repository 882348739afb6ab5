"""Every family end to end: a random checkpoint in its real layout, served by the real engine and app,
queried with the `openai` client. The served greedy tokens must equal the model's own greedy tokens
(tests/models/harness.py), and chat streaming must follow OpenAI's framing with usage.

A character-level tokenizer (64 entries, smaller than every family's test vocabulary) lets text go in
and out of models whose vocabularies are tiny.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from rnnserve.config import ModelConfig
from rnnserve.models.loader import load_model
from tests.conftest import build_random_hf_model
from tests.models.harness import greedy_generate
from tests.server.conftest import CHAT_TEMPLATE, make_app

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\n:<>|/-"


def write_char_tokenizer(folder: Path) -> None:
    """A byte-free, character-level fast tokenizer: id 0 is EOS, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _hf(config) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        build_random_hf_model(config, seed=0).save_pretrained(folder)

    return build


def _mamba(folder: Path) -> None:
    from transformers import MambaConfig

    _hf(MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, tie_word_embeddings=False))(
        folder
    )


def _mamba2(folder: Path) -> None:
    from transformers import Mamba2Config

    config = Mamba2Config(
        vocab_size=96, hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=8,
        num_hidden_layers=2, chunk_size=16, tie_word_embeddings=False,
    )  # fmt: skip
    _hf(config)(folder)


def _rwkv4(folder: Path) -> None:
    from transformers import RwkvConfig

    config = RwkvConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
        context_length=256,
    )  # fmt: skip
    _hf(config)(folder)


def _rwkv7(folder: Path) -> None:
    import json

    from safetensors.torch import save_file

    from tests.models import test_rwkv7 as t

    folder.mkdir(parents=True)
    sd = t._to_fla(t._blinkdl_state_dict(seed=0))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(t._fla_config()))


def _retnet(folder: Path) -> None:
    from tests.models import test_retnet as t

    c = t.fla_config()
    t.save_folder(folder, c, t.fla_state_dict(c))


def _dense_retnet(folder: Path) -> None:
    from tests.models import test_dense_retnet as t

    c = t.dense_config()
    t.save_folder(folder, c, t.dense_state_dict(c))


def _dense_mamba(folder: Path) -> None:
    import shutil

    from tests.models import test_dense_mamba as t

    built = t.dense_folder(folder.parent, m=1)[0]
    shutil.copytree(built, folder)


def _llama(folder: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    _hf(config)(folder)


FAMILIES: dict[str, Callable[[Path], None]] = {
    "mamba": _mamba,
    "mamba2": _mamba2,
    "rwkv4": _rwkv4,
    "rwkv7": _rwkv7,
    "retnet": _retnet,
    "dense_retnet": _dense_retnet,
    "dense_mamba": _dense_mamba,
    "llama": _llama,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    from fastapi.testclient import TestClient

    folder = tmp_path_factory.mktemp(request.param) / "model"
    FAMILIES[request.param](folder)
    write_char_tokenizer(folder)
    with TestClient(make_app(folder, name=request.param, max_num_seqs=4)) as client:
        yield folder, client


def test_served_greedy_tokens_equal_the_model_alone(served: tuple[Path, object]) -> None:
    from openai import OpenAI

    folder, client = served
    api = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    model = api.models.list().data[0].id
    out = api.completions.create(
        model=model,
        prompt="hello, world! state spaces",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = out.choices[0]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    assert out.usage.prompt_tokens == len(prompt_ids) == len("hello, world! state spaces")
    assert out.usage.completion_tokens == 12
    assert choice.finish_reason == "length"
    torch.manual_seed(0)
    alone = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    assert choice.model_extra["token_ids"] == greedy_generate(alone, prompt_ids, 12)


def test_chat_streams_with_usage(served: tuple[Path, object]) -> None:
    from openai import OpenAI

    _, client = served
    api = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    model = api.models.list().data[0].id
    stream = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi there"}],
        max_tokens=6,
        temperature=0.8,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert usage.usage.prompt_tokens > len("hi there")
