"""The file formats lora-offset reads and writes, pure where possible.

keys.py        kohya module key names
kohya.py       kohya / A1111 LoRA files: state dict, ss_* metadata, sshs_* hashes, saving
lycoris.py     LyCORIS LoHa / LoKr files (kohya naming), written from PEFT adapters
reader.py      reading any SD 1.x LoRA file (kohya, diffusers, PEFT, LyCORIS): the one reader the commands share
modules.py     one adapted module (LoRA / LoHa / LoKr): factors, the scale loaders apply, its delta
ldm.py         the diffusers <-> LDM key map of single-file SD 1.x checkpoints
checkpoint.py  reading single-file checkpoints and loading them as diffusers components
clip_tokenizer.py  SD 1.x's CLIP ViT-L/14 tokenizer, built from OpenAI's CLIP BPE vocabulary file
loaders/       what each web UI's LoRA loader does with a file (oracles)
"""
