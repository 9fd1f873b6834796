"""Speculative decoding: proposers guess the next tokens cheaply, the engine verifies them
all in one forward pass of the target model (see yun/engine/spec/verify.py), and a
controller decides how many to propose (yun/engine/spec/controller.py)."""
