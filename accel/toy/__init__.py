"""A toy task for a trained tiny FLUX pipeline: coloured shapes, their prompts, a checker, the trainer."""
