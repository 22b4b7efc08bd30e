"""The naive baseline: a Flask endpoint that sends each message itself, synchronously.

What many services start as: validate nothing, build an ``EmailMessage``, open an SMTP
connection, send, close, answer. No queue, no retries, no record — a message in flight is
lost when the process dies. ``bench/bench_pipeline.py`` runs it under gunicorn (sync
workers) against the same sink as postroom:

    BENCH_SMTP_PORT=2525 gunicorn -w 4 --chdir bench baseline_naive_app:app

``POST /send`` takes ``{"to": [...], "subject": "...", "text": "..."}`` and answers 200
``{"messageId": "<...>"}`` once the relay accepted the message.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import make_msgid

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

SMTP_HOST = os.environ.get("BENCH_SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "1025"))
DOMAIN = os.environ.get("BENCH_SENDER_DOMAIN", "naive.localhost")
SENDER = f"no-reply@{DOMAIN}"

app = Flask(__name__)


@app.post("/send")
def send() -> ResponseReturnValue:
    body = request.get_json()
    msg = EmailMessage(policy=SMTP_POLICY)  # CRLF line endings, as SMTP wants
    msg["From"] = SENDER
    msg["To"] = ", ".join(body["to"])
    msg["Subject"] = body.get("subject", "")
    msg["Message-ID"] = make_msgid(domain=DOMAIN)  # domain=: no getfqdn() per message
    msg.set_content(body.get("text", ""))
    with smtplib.SMTP(SMTP_HOST, SMTP_PORT, local_hostname=DOMAIN, timeout=30) as smtp:
        smtp.send_message(msg)
    return jsonify({"messageId": msg["Message-ID"]})
