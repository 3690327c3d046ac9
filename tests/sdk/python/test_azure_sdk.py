"""The official `openai` Python SDK's `AzureOpenAI` client against a running
balancer gateway, as an app written for Azure OpenAI points at it.

Run by tests/it/sdk.rs, twice: in front of an Azure deployment (an
Azure-mode mock) and in front of an OpenAI-style node. It passes where the
gateway is in the environment:

- BALANCER_ENDPOINT: the gateway's origin, as `azure_endpoint`;
- BALANCER_KEY: a gateway key, sent as `api-key`;
- BALANCER_EMBEDDING: the mock's embedding, as JSON.

After each call, the node's tokens in /status grew by what the answer says
it used.
"""

import json
import os
import time
import unittest
import urllib.request

import openai

ENDPOINT = os.environ["BALANCER_ENDPOINT"]
KEY = os.environ["BALANCER_KEY"]
EMBEDDING = json.loads(os.environ["BALANCER_EMBEDDING"])
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say hello to the Azure SDK test."}]


def client():
    return openai.AzureOpenAI(
        azure_endpoint=ENDPOINT, api_key=KEY, api_version=API_VERSION, max_retries=0, timeout=30)


def node_tokens():
    """The node's tokens in its window once nothing is reserved."""
    for _ in range(200):
        with urllib.request.urlopen(ENDPOINT + "/status") as answer:
            node = json.load(answer)["nodes"][0]
        if node["reserved_tokens"] == 0 and node["in_flight"] == 0:
            return node["limits"]["tpm"]["used"]
        time.sleep(0.05)
    raise AssertionError("the gateway never settled")


class AzureClient(unittest.TestCase):
    def test_chat_completion(self):
        before = node_tokens()
        reply = client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
        self.assertTrue(reply.choices[0].message.content)
        self.assertGreater(reply.usage.completion_tokens, 0)
        used = node_tokens() - before
        # An Azure deployment is charged its reservation at arrival, at
        # least what the answer used.
        self.assertGreaterEqual(used, reply.usage.total_tokens)

    def test_streaming_with_usage(self):
        before = node_tokens()
        chunks = list(client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertTrue(text)
        usage = chunks[-1].usage
        self.assertGreater(usage.completion_tokens, 0)
        self.assertGreaterEqual(node_tokens() - before, usage.total_tokens)

    def test_embeddings(self):
        before = node_tokens()
        result = client().embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        self.assertEqual(len(result.data), 2)
        self.assertEqual([float(x) for x in result.data[0].embedding], EMBEDDING)
        self.assertEqual(node_tokens() - before, result.usage.total_tokens)

    def test_a_wrong_key_raises_authentication_error(self):
        wrong = openai.AzureOpenAI(
            azure_endpoint=ENDPOINT, api_key="not-a-gateway-key", api_version=API_VERSION, max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


if __name__ == "__main__":
    unittest.main(verbosity=2)
