"""instructloop's learner: reward model, SFT, PPO-ptx, gate, publish."""
