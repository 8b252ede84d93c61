"""Ways mail reaches the spool: SMTP (smtp.py)."""
