"""The official `openai` Python SDK against a running balancer gateway.

Run by tests/it/sdk.rs, which starts the gateway in front of mock upstreams
on 127.0.0.1 and passes where it is in the environment:

- BALANCER_BASE_URL: the gateway's /v1 URL;
- BALANCER_KEY: a gateway key with no limits of its own;
- BALANCER_LIMITED_KEY: a client key with a token bucket of 1 request,
  refilled every 2 s (so its 429 says Retry-After: 2);
- BALANCER_EMBEDDING: the mock's embedding, as JSON.

Each test states one thing a user of the SDK relies on.
"""

import json
import os
import time
import unittest
import urllib.request

import openai

BASE_URL = os.environ["BALANCER_BASE_URL"]
KEY = os.environ["BALANCER_KEY"]
LIMITED_KEY = os.environ["BALANCER_LIMITED_KEY"]
EMBEDDING = json.loads(os.environ["BALANCER_EMBEDDING"])
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "Say hello to the SDK test."}]


def client(key=KEY, max_retries=0):
    return openai.OpenAI(base_url=BASE_URL, api_key=key, max_retries=max_retries, timeout=30)


STATUS_URL = BASE_URL.removesuffix("/v1") + "/status"


def node_tokens():
    """The node's tokens in its window once nothing is reserved (the
    gateway settles a request just after its last byte)."""
    for _ in range(200):
        with urllib.request.urlopen(STATUS_URL) as answer:
            node = json.load(answer)["nodes"][0]
        if node["reserved_tokens"] == 0 and node["in_flight"] == 0:
            return node["limits"]["tpm"]["used"]
        time.sleep(0.05)
    raise AssertionError("the gateway never settled")


def drain(key):
    """Spends the limited client's bucket until the gateway refuses it."""
    for _ in range(5):
        try:
            client(key).chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5)
        except openai.RateLimitError as err:
            return err
    raise AssertionError("the limited client was never refused")


class Completions(unittest.TestCase):
    def test_chat_completion(self):
        reply = client().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=20)
        self.assertEqual(reply.object, "chat.completion")
        self.assertTrue(reply.choices[0].message.content)
        self.assertEqual(reply.choices[0].message.role, "assistant")
        self.assertGreater(reply.usage.prompt_tokens, 0)
        self.assertGreater(reply.usage.completion_tokens, 0)

    def test_streaming_without_usage(self):
        chunks = list(client().chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=20, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertGreater(len(chunks), 2, "the answer arrives in several events")
        self.assertTrue(text)
        self.assertTrue(all(c.usage is None for c in chunks))

    def test_streaming_with_include_usage(self):
        chunks = list(client().chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
        last = chunks[-1]
        self.assertEqual(last.choices, [], "usage comes in a final event without choices")
        self.assertGreater(last.usage.prompt_tokens, 0)
        self.assertGreater(last.usage.completion_tokens, 0)
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))

    def test_embeddings(self):
        # The SDK asks for base64 and decodes it to floats.
        result = client().embeddings.create(model=EMBEDDING_MODEL, input=["hello", "world"])
        self.assertEqual(len(result.data), 2)
        self.assertEqual([float(x) for x in result.data[0].embedding], EMBEDDING)
        self.assertGreater(result.usage.prompt_tokens, 0)

    def test_models_list(self):
        ids = [m.id for m in client().models.list()]
        self.assertIn(CHAT_MODEL, ids)
        self.assertIn(EMBEDDING_MODEL, ids)
        self.assertEqual(client().models.retrieve(CHAT_MODEL).id, CHAT_MODEL)


class Responses(unittest.TestCase):
    """The Responses API, settled at the usage its answer reports."""

    def test_a_response(self):
        before = node_tokens()
        reply = client().responses.create(
            model=CHAT_MODEL, instructions="Be brief.", input="Say hello.", max_output_tokens=20)
        self.assertEqual(reply.object, "response")
        self.assertTrue(reply.output_text)
        self.assertGreater(reply.usage.input_tokens, 0)
        self.assertGreater(reply.usage.output_tokens, 0)
        self.assertEqual(node_tokens() - before, reply.usage.total_tokens)

    def test_a_streamed_response(self):
        before = node_tokens()
        events = list(client().responses.create(
            model=CHAT_MODEL, input=[{"role": "user", "content": "Say hello."}],
            max_output_tokens=20, stream=True))
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        self.assertGreater(len(deltas), 1)
        done = events[-1]
        self.assertEqual(done.type, "response.completed")
        self.assertEqual(done.response.output_text, "".join(deltas).strip())
        usage = done.response.usage
        self.assertGreater(usage.output_tokens, 0)
        self.assertEqual(node_tokens() - before, usage.input_tokens + usage.output_tokens)


class Errors(unittest.TestCase):
    def test_a_wrong_key_raises_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as caught:
            client(key="sk-not-a-gateway-key").chat.completions.create(
                model=CHAT_MODEL, messages=MESSAGES)
        self.assertEqual(caught.exception.status_code, 401)
        self.assertEqual(caught.exception.code, "invalid_api_key")

    def test_an_unknown_model_raises_not_found_error(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            client().chat.completions.create(model="no-such-model", messages=MESSAGES)
        self.assertEqual(caught.exception.code, "model_not_found")
        self.assertIn("no-such-model", caught.exception.message)

    def test_a_request_no_node_could_ever_take_raises_bad_request_error(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            client().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=10_000_000)
        self.assertEqual(caught.exception.code, "request_too_large")

    def test_a_client_over_its_limit_raises_rate_limit_error_with_retry_after(self):
        err = drain(LIMITED_KEY)
        self.assertEqual(err.status_code, 429)
        self.assertEqual(err.code, "client_rate_limit_exceeded")
        self.assertEqual(err.type, "rate_limit_error")
        self.assertIn(err.response.headers["retry-after"], ("1", "2"))

    def test_the_sdk_waits_the_retry_after_then_succeeds(self):
        drain(LIMITED_KEY)
        started = time.monotonic()
        # One retry only: its own backoff (0.5 s at most) would come back
        # before the bucket refills; waiting our Retry-After succeeds.
        reply = client(LIMITED_KEY, max_retries=1).chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=5)
        waited = time.monotonic() - started
        self.assertTrue(reply.choices[0].message.content)
        self.assertGreaterEqual(waited, 1.0)
        self.assertLess(waited, 10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
