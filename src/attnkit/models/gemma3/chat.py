"""Gemma 3's chat format, built in: its GGUF files carry no ``tokenizer.chat_template``.

A turn is ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n`` with role ``user`` or ``model`` (the
assistant), after one ``<bos>``; a system message has no turn of its own, it opens the first user
turn as written, followed by a blank line. Turn contents are stripped of surrounding whitespace,
and the roles must alternate, starting with the user. The prompt ends with ``<start_of_turn>model\\n`` for the answer,
which ends at ``<end_of_turn>``.
"""

from __future__ import annotations

from ..gguf_tokenizer import ChatTemplate
from .config import END_OF_TURN

_SOURCE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set opening = messages[0]['content'] ~ '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set opening = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Gemma 3 chats alternate user and assistant turns, starting with the user') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' }}"
    "{{ opening if loop.first else '' }}{{ message['content'] | trim }}{{ '" + END_OF_TURN + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

CHAT_TEMPLATE = ChatTemplate(_SOURCE, bos_token="<bos>", eos_token=END_OF_TURN)
"""Gemma 3's chat template; its ``eos_token`` is the end-of-turn marker that ends an answer."""
