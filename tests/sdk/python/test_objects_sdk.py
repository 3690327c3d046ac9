"""Stored objects through the gateway with the official `openai` Python SDK:
files, batches, stored responses and transcriptions over a pool of keys.

Run by tests/it/sdk.rs, which starts two gateway replicas sharing one
PostgreSQL store in front of three mock nodes (node `a` alone serves
`whisper-1`; node `c` has been taken out of rotation after a file was
stored on it) and passes in the environment:

- BALANCER_BASE_URL, BALANCER_REPLICA_URL: the two replicas' /v1 URLs;
- BALANCER_KEY: a gateway key (the shared group);
- BALANCER_OTHER_KEY: another client's key;
- BALANCER_UNAVAILABLE_FILE: the caller's file held by node `c`.

The mocks keep objects per key: a request that reached the wrong node
would fail with the mock's own 404.
"""

import os
import time
import unittest

import openai

BASE_URL = os.environ["BALANCER_BASE_URL"]
REPLICA_URL = os.environ["BALANCER_REPLICA_URL"]
KEY = os.environ["BALANCER_KEY"]
OTHER_KEY = os.environ["BALANCER_OTHER_KEY"]
UNAVAILABLE_FILE = os.environ["BALANCER_UNAVAILABLE_FILE"]
BATCH_INPUT = (
    b'{"custom_id":"r1","method":"POST","url":"/v1/chat/completions",'
    b'"body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}}\n'
)


def client(key=KEY, url=BASE_URL):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def replica(key=KEY):
    return client(key, REPLICA_URL)


def upload(c, name="in.jsonl"):
    return c.files.create(file=(name, BATCH_INPUT), purpose="batch")


class Objects(unittest.TestCase):
    def test_a_file_its_batch_and_the_output_across_replicas(self):
        file = upload(client())
        batch = replica().batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        for _ in range(50):
            batch = client().batches.retrieve(batch.id)
            if batch.status == "completed":
                break
            time.sleep(0.1)
        self.assertEqual(batch.status, "completed")
        output = replica().files.content(batch.output_file_id).text
        self.assertIn('"custom_id":"r1"', output)
        self.assertTrue(client().files.delete(file.id).deleted)
        # Gone on both replicas: the other may still hold the record for
        # store.cache_ttl and relay the node's own 404 (then forgets it).
        for c in (client(), replica(), replica()):
            with self.assertRaises(openai.NotFoundError):
                c.files.retrieve(file.id)
        with self.assertRaises(openai.NotFoundError) as caught:
            replica().files.retrieve(file.id)
        self.assertEqual(caught.exception.code, "object_not_found")

    def test_a_stored_response_continued_twenty_times_on_its_node(self):
        raw = client().responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
        node = raw.headers["x-balancer-node"]
        previous = raw.parse().id
        for turn in range(20):
            c = replica() if turn % 2 else client()
            raw = c.responses.with_raw_response.create(
                model="gpt-4o-mini", input="and then?", previous_response_id=previous)
            self.assertEqual(raw.headers["x-balancer-node"], node, f"turn {turn}")
            previous = raw.parse().id
        self.assertEqual(client().responses.retrieve(previous).id, previous)

    def test_a_transcription_goes_to_the_node_that_serves_its_model(self):
        raw = client().audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("a.wav", b"RIFF" + bytes(9000)))
        self.assertEqual(raw.headers["x-balancer-node"], "a")
        self.assertTrue(raw.parse().text)

    def test_another_client_gets_404_for_a_file_and_a_batch(self):
        file = upload(client())
        batch = client().batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        for ask in (lambda c: c.files.retrieve(file.id), lambda c: c.batches.retrieve(batch.id)):
            with self.assertRaises(openai.NotFoundError) as caught:
                ask(replica(OTHER_KEY))
            self.assertEqual(caught.exception.code, "object_not_found")
        self.assertEqual(client().files.retrieve(file.id).id, file.id)

    def test_an_object_on_a_node_out_of_rotation_is_unavailable(self):
        with self.assertRaises(openai.APIStatusError) as caught:
            client().files.retrieve(UNAVAILABLE_FILE)
        self.assertEqual(caught.exception.status_code, 503)
        self.assertEqual(caught.exception.code, "object_unavailable")
        self.assertIn("'c'", caught.exception.message)
        # Everything else keeps working.
        reply = client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        self.assertTrue(reply.choices[0].message.content)

    def test_lists_page_across_nodes(self):
        made = {upload(client(), f"p{i}.jsonl").id for i in range(5)}
        listed = [f.id for f in replica().files.list(limit=2)]
        self.assertTrue(made <= set(listed), f"{made} not all in {listed}")
        self.assertEqual(len(listed), len(set(listed)), "no file twice")
        self.assertFalse(made & {f.id for f in client(OTHER_KEY).files.list()})


if __name__ == "__main__":
    unittest.main(verbosity=2)
