"""HAQ (Wang et al., CVPR 2019): mixed precision found by a DDPG agent with the hardware in the loop."""
