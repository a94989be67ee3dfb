"""Small random-weight Hugging Face CLIP and SigLIP folders, built offline: real architectures
(transformers' CLIPModel / SiglipModel) with tiny configs, saved with real tokenizers (CLIP's
BPE from open_clip's vocabulary; a small SentencePiece model trained here for SigLIP)."""
from __future__ import annotations

import io
from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
WORDS = ("a photo of the cat sea lion ankle boot t-shirt zero dog truck small big picture x circle square "
         "triangle here there itap of").split()


def clip_folder(d: Path) -> Path:
    import torch
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()  # OpenAI's BPE: the same ids as openai/clip-vit-* tokenizers
    special = {49406: "<|startoftext|>", 49407: "<|endoftext|>"}
    vocab = {special.get(i, t): i for t, i in st.encoder.items()}
    merges = [tuple(m) for m in sorted(st.bpe_ranks, key=st.bpe_ranks.get)]
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **TINY),
        vision_config=dict(image_size=32, patch_size=8, **TINY), projection_dim=32)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def siglip_folder(d: Path) -> Path:
    import sentencepiece as spm
    import torch
    import transformers

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=48, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   unk_piece="<unk>", minloglevel=2)
    d.mkdir(parents=True, exist_ok=True)
    (d / "spiece.model").write_bytes(buf.getvalue())
    tok = transformers.SiglipTokenizer(vocab_file=str(d / "spiece.model"))
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=tok.vocab_size, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, **TINY),
        vision_config=dict(image_size=32, patch_size=8, **TINY))
    torch.manual_seed(0)
    m = transformers.SiglipModel(cfg)
    with torch.no_grad():
        m.logit_bias.fill_(-2.0)  # SigLIP's logits carry a bias: make it visible
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d
