"""The reference path: attention and scheduling written to be read and to be obviously correct.

Nothing here is optimised. The fast path is tested against it token for token.
"""
