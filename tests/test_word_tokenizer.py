"""The trained tiny text encoder's word tokenizer: whole-word ids for the caption vocabulary, bytes
for everything else (issue 17)."""

import pytest
import torch

from adapters.infinity.text import (WORD_TOKENIZER_FILE, ByteTokenizer, WordTokenizer, load_text_encoder,
                                    tiny_t5_config, trained_text_encoder)
from adapters.tiny import scenes


def test_caption_words_are_one_id_each_and_other_words_fall_back_to_bytes():
    tokenizer = WordTokenizer(scenes.VOCABULARY, 96)
    caption = scenes.sample_scene(0, 3).caption
    ids = tokenizer.encode(caption)
    base = ByteTokenizer.vocab_size
    assert ids == [base + scenes.VOCABULARY.index(w) for w in caption.split()] + [1]
    assert tokenizer.decode(ids) == caption
    assert tokenizer.vocab_size == base + len(scenes.VOCABULARY)
    # an unknown word is spelled in bytes (space byte first unless it starts the text): nothing is dropped
    ids = tokenizer.encode("Red fluffy cat")
    assert ids == [b + 3 for b in b"Red fluffy cat"] + [1]
    assert tokenizer.encode("a fluffy red") == [base + 0] + [b + 3 for b in b" fluffy"] + [base + scenes.VOCABULARY.index("red"), 1]
    assert tokenizer.decode(tokenizer.encode("a fluffy red")) == "a fluffy red"
    # truncation keeps the end of sequence; padding as the byte tokenizer
    assert tokenizer.encode(caption, max_length=4) == ids[:0] + [base + scenes.VOCABULARY.index(w) for w in caption.split()[:3]] + [1]
    batch = tokenizer(["a red", "a red circle"], padding="longest")
    assert batch["input_ids"].tolist() == [[base, base + scenes.VOCABULARY.index("red"), 1, 0],
                                           [base, base + scenes.VOCABULARY.index("red"),
                                            base + scenes.VOCABULARY.index("circle"), 1]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4]


@pytest.mark.parametrize("words", [[], ["a", "a"], ["two words"], [""], [3]])
def test_a_bad_vocabulary_is_refused(words):
    with pytest.raises(ValueError, match="words must be distinct non-empty strings"):
        WordTokenizer(words)


def test_the_trained_encoder_loads_with_the_tokenizer_file_beside_its_weights(tmp_path):
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    tokenizer = WordTokenizer(scenes.VOCABULARY, 96)
    torch.manual_seed(0)
    model = T5EncoderModel(tiny_t5_config(128, tokenizer.vocab_size)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "shared.weight"},
              str(tmp_path / "text_encoder.safetensors"))
    tokenizer.save(tmp_path / WORD_TOKENIZER_FILE)
    encoder = trained_text_encoder(tmp_path / "text_encoder.safetensors", 128, max_length=96)
    assert isinstance(encoder.tokenizer, WordTokenizer) and encoder.tokenizer.words == scenes.VOCABULARY
    caption = scenes.sample_scene(0, 5).caption
    features = encoder([caption])[0]
    assert features.shape == (len(caption.split()) + 1, 128)
    ids = torch.tensor([tokenizer.encode(caption)])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    torch.testing.assert_close(features, expected)
    # save_pretrained / load_text_encoder find the word tokenizer in a folder too
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    loaded = load_text_encoder(tmp_path / "t5", max_length=96)
    assert isinstance(loaded.tokenizer, WordTokenizer)
    torch.testing.assert_close(loaded([caption])[0], expected)
