"""What a message can make happen: a new share (share.py)."""
