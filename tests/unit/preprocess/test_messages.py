"""OpenAI messages -> (query, history): turn pairing, content parts, system and text-only rules."""

from __future__ import annotations

import pytest

from cogvlm_ray.errors import InvalidRequestError
from cogvlm_ray.preprocess.messages import TEXT_ONLY_PREAMBLE, apply_conversation_rules, parse_messages


def _user(content):
    return {"role": "user", "content": content}


def _assistant(content):
    return {"role": "assistant", "content": content}


def test_turns_pair_into_history():
    conv = parse_messages([_user("q1"), _assistant("r1"), _user("q2"), _assistant("r2"), _user("q3")])
    assert conv.query == "q3" and conv.history == [("q1", "r1"), ("q2", "r2")] and conv.system is None


def test_text_parts_are_joined_and_images_collected():
    conv = parse_messages(
        [
            _user(
                [
                    {"type": "text", "text": "first"},
                    {"type": "image_url", "image_url": {"url": "data:a"}},
                    {"type": "text", "text": "second"},
                ]
            )
        ]
    )
    assert conv.query == "first\nsecond" and conv.image_urls == ["data:a"]


def test_assistant_content_parts_are_text():
    conv = parse_messages([_user("q"), _assistant([{"type": "text", "text": "r"}]), _user("q2")])
    assert conv.history == [("q", "r")]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([_assistant("hi")], "'user' was expected"),
        ([_user("a"), _user("b")], "must alternate"),
        ([_user("a"), _assistant("b")], "last non-system message must be from the user"),
        ([{"role": "system", "content": "s"}], "last non-system message"),
        ([{"role": "tool", "content": "x"}], "role 'tool' is not supported"),
        ([_user(None)], "string or a list"),
        ([_user([{"type": "input_audio"}])], "type 'input_audio' is not supported"),
        ([_user([{"type": "text"}])], "text must be a string"),
        ([_user([{"type": "image_url", "image_url": {}}])], "url must be a non-empty string"),
        (
            [_user("q"), _assistant([{"type": "image_url", "image_url": {"url": "data:x"}}]), _user("q")],
            "only accepted in user messages",
        ),
        (["hello"], "must be an object"),
    ],
)
def test_invalid_messages_are_400(messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_messages(messages)


def test_text_only_chat_uses_preamble_on_first_turn_and_user_assistant_markers_later():
    conv = parse_messages([_user("q1"), _assistant("r1"), _user("q2")])
    query, history = apply_conversation_rules(conv, has_image=False, template_version="chat")
    assert history == [(f"{TEXT_ONLY_PREAMBLE} USER: q1 ASSISTANT:", "r1")]
    assert query == "USER: q2 ASSISTANT:"  # history appears once, not duplicated into the query


def test_text_only_first_turn_matches_model_card_template():
    conv = parse_messages([_user("Hi")])
    query, history = apply_conversation_rules(conv, has_image=False, template_version="chat")
    model_card = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:"
    )
    assert query == model_card.format("Hi") and history == []


def test_system_replaces_preamble_when_text_only():
    conv = parse_messages(
        [{"role": "system", "content": "Be terse."}, _user("q1"), _assistant("r1"), _user("q2")]
    )
    query, history = apply_conversation_rules(conv, has_image=False, template_version="chat")
    assert history == [("Be terse. USER: q1 ASSISTANT:", "r1")] and query == "USER: q2 ASSISTANT:"


def test_system_prefixes_first_user_turn_with_image():
    conv = parse_messages(
        [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": "Answer in English."},
            _user("q1"),
            _assistant("r1"),
            _user("q2"),
        ]
    )
    query, history = apply_conversation_rules(conv, has_image=True, template_version="chat")
    assert history == [("Be terse.\nAnswer in English. q1", "r1")] and query == "q2"


def test_system_prefixes_query_for_base_template_and_no_preamble_without_chat():
    conv = parse_messages([{"role": "system", "content": "S"}, _user("A photo of")])
    assert apply_conversation_rules(conv, has_image=True, template_version="base") == ("S A photo of", [])
    plain = parse_messages([_user("q")])
    assert apply_conversation_rules(plain, has_image=False, template_version="vqa") == ("q", [])
    assert apply_conversation_rules(plain, has_image=True, template_version="chat") == ("q", [])
