"""Outbound mail: render (compose), queue (outbox), send (mailer) and drive (dispatcher)."""
