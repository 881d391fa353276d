"""Alignment: turn a pretrained model into one that follows instructions, with the one training loop.

    chat_data.py    messages jsonl -> chat-template ids with an assistant-only mask, packed rows
    sft.py          SFTObjective: next-token loss over the step's assistant tokens
    lora.py         LoRA adapters (apply, merge, save/load) and the commands' --lora-* flags
    preference.py   DPO / IPO losses, preference data, the Bradley-Terry reward model
    tasks.py        built-in tasks with verifiable answers (arithmetic, countdown)
    verifiers.py    reward functions that check an answer
    rl.py           GRPO and PPO: rollouts, advantages, clipped losses

Import the submodules directly (`from velocis.align.sft import SFTObjective`); nothing heavy here.
"""
