"""Speculative decoding: proposers (n-gram prompt lookup, suffix decoding, draft model, and
plug-ins registered by name in registry.py) and the rejection sampler.

A proposer suggests up to k draft tokens per request; the target model scores them all in one
forward (a multi-token query in the same packed batch as everyone else); the rejection sampler
keeps the longest prefix the target agrees with and adds one token of its own, so each step
yields between 1 and k + 1 tokens with exactly the target's output distribution.
"""
