"""Text sources, token windows and perplexity (fast, offline; downloads are marked ``network``)."""

import importlib.util
import json
import math
import random

import pytest
import torch

from convert.data import brown_detokenize, load_texts, token_windows
from convert.errors import MLAError
from eval.perplexity import main, perplexity

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat ran too .",
    "models read text , one token at a time .",
    "latent attention keeps a small cache per token .",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_pydoc():
    docs = load_texts("pydoc")
    assert len(docs) > 50 and all(d.strip() for d in docs)
    assert sum(map(len, docs)) > 100_000
    assert docs == load_texts("pydoc")


def test_local_sources(tmp_path):
    (tmp_path / "one.txt").write_text("hello world")
    assert load_texts(str(tmp_path / "one.txt")) == ["hello world"]
    rows = [{"text": "first doc"}, {"text": "second doc", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(str(tmp_path / "d.jsonl")) == ["first doc", "second doc"]
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.txt").write_text("A")
    (tmp_path / "sub" / "deep" / "c.txt").write_text("C")
    (tmp_path / "sub" / "skip.md").write_text("not text")
    assert load_texts(str(tmp_path / "sub")) == ["A", "B", "C"]


@pytest.mark.parametrize("spec, words", [
    ("no/such/file.txt", "unknown text source 'no/such/file.txt'"),
    ("nonsense", "unknown text source 'nonsense'"),
    ("", "unknown text source ''"),
    ("bbc:weather", "unknown BBC category 'weather'"),
    ("brown:z", "unknown Brown genre 'z'"),
    ("hf:x:y:z:w:v", r"expected hf:<dataset>\[:<config>\]:<split>\[:<column>\]"),
])
def test_bad_specs(spec, words):
    with pytest.raises(MLAError, match=words):
        load_texts(spec)


def test_unreadable_local(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "emptydir").mkdir()
    for name in ["bad.txt", "empty.txt", "bad.jsonl", "nofield.jsonl", "emptydir"]:
        with pytest.raises(MLAError, match="text source"):
            load_texts(str(tmp_path / name))


@pytest.mark.skipif(HAS_DATASETS, reason="datasets is installed")
def test_hf_without_datasets():
    with pytest.raises(MLAError, match="pip install datasets"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test:text")


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets is not installed")
def test_hf_local_stand_in(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    assert load_texts(f"hf:{tmp_path}:train:text") == ["alpha", "beta"]
    with pytest.raises(MLAError, match="column"):
        load_texts(f"hf:{tmp_path}:train:body")


def test_brown_detokenize():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` it's/pps+bez fine/jj ''/'' ,/, and/cc (/( so/rb )/) it/pps "
           "wasn't/bedz* ;/. ;/. 1/2/cd was/bedz ?/. ?/.\n\n\n\tNext/ap ./.\n")
    assert brown_detokenize(raw) == "The jury said \"it's fine\", and (so) it wasn't; 1/2 was?\n\nNext."


def test_token_windows(tokenizer):
    texts = SENTENCES * 20
    w = token_windows(tokenizer, texts, seq_len=16, n_seqs=None)
    assert w.dtype == torch.long and w.shape[1] == 16
    assert (w[:, 0] == tokenizer.bos_token_id).all()
    assert (w[:, 1:] == tokenizer.eos_token_id).any()  # documents are joined by EOS
    n_all = w.shape[0]
    stream = w[:, 1:].reshape(-1)
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert stream[: len(ids)].tolist() == ids

    a = token_windows(tokenizer, texts, 16, n_seqs=5, seed=0)
    assert a.shape == (5, 16) and torch.equal(a, token_windows(tokenizer, texts, 16, n_seqs=5, seed=0))
    assert torch.equal(a, w[sorted(random.Random(0).sample(range(n_all), 5))])  # kept in stream order
    assert any(not torch.equal(a, token_windows(tokenizer, texts, 16, n_seqs=5, seed=s)) for s in range(1, 4))
    assert token_windows(tokenizer, texts, 16, n_seqs=10_000).shape[0] == n_all

    nb = token_windows(tokenizer, texts, 16, n_seqs=None, bos=False)
    assert nb.shape[1] == 16 and (nb[:, 0] != tokenizer.bos_token_id).any()
    with pytest.raises(MLAError):
        token_windows(tokenizer, ["the cat"], seq_len=64, n_seqs=None)


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_perplexity_matches_model_loss(tokenizer):
    model = _tiny_llama(len(tokenizer))
    windows = token_windows(tokenizer, SENTENCES * 20, seq_len=24, n_seqs=7)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, windows, batch_size=3)
    assert abs(got - expected) / expected < 1e-4


def test_perplexity_cli(tokenizer, tmp_path, capsys):
    model = _tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(SENTENCES * 30))
    out = tmp_path / "r.json"
    args = [str(tmp_path / "m"), "--baseline", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"),
            "--seq-len", "32", "--tokens", "128", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["windows"] == 4 and r["tokens"] == 128 and r["ratio"] == pytest.approx(1.0)
    assert "ratio 1.000x on 128 tokens of" in capsys.readouterr().out
    assert main([str(tmp_path / "nope"), "--text", "pydoc"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.network
@pytest.mark.parametrize("spec,n", [("bbc:tech", 401), ("bbc:sport+politics", 511 + 417), ("bbc", 2225)])
def test_bbc(spec, n):
    docs = load_texts(spec)
    assert len(docs) == n and all(d.strip() for d in docs)


@pytest.mark.network
def test_brown():
    docs = load_texts("brown")
    assert len(docs) == 500
    press = load_texts("brown:abc")
    assert len(press) == 88 and press[0].startswith("The Fulton County Grand Jury said Friday")
    assert "/at" not in press[0] and "``" not in press[0]
