"""Tiny randomly initialised models built from configs (no downloads), shared by the tests."""
import torch


def tiny_bert_qa():
    from transformers import BertConfig, BertForQuestionAnswering
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertForQuestionAnswering(cfg)


def tiny_wav2vec2_ctc():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    cfg = Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                         do_stable_layer_norm=True, mask_time_prob=0.0)
    return Wav2Vec2ForCTC(cfg)


def tiny_vit(**kw):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=4, num_classes=10, **kw)


def logits(model, batch) -> list:
    """The model's logits (common.logits_of) for a batch given as a dict of inputs or one tensor."""
    import common
    return common.logits_of(model(**batch) if isinstance(batch, dict) else model(batch))


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)


def bert_batch(b=2, seq=16):
    ids = torch.randint(0, 128, (b, seq))
    am = torch.ones(b, seq, dtype=torch.long)
    am[-1, seq // 2:] = 0
    return dict(input_ids=ids, attention_mask=am)


def wav_batch(b=2, n=1600):
    x = torch.randn(b, n)
    am = torch.ones(b, n, dtype=torch.long)
    am[-1, n // 2:] = 0
    x[-1, n // 2:] = 0
    return dict(input_values=x, attention_mask=am)
