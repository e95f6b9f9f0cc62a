"""Whole-utterance TTS with dynamic batching; Triton's response cache serves repeats."""

import time

import triton_python_backend_utils as pb

from ttsfleet.serving.backend import Metrics, load, outputs, read_request
from ttsfleet.serving.engine import RequestError


class TritonPythonModel:
    def initialize(self, args):
        self.engine, name = load(pb, args)
        self.metrics = Metrics(pb, name)

    def execute(self, requests):
        responses = []
        for request in requests:
            arrived = time.perf_counter()
            self.metrics.inflight.increment(1)
            try:
                req = read_request(pb, request, self.engine.voice_name)
                audio = self.engine.synthesize(req.text, req.rate)
                self.metrics.ttfa.observe(time.perf_counter() - arrived)
                self.metrics.audio_seconds.increment(len(audio) / self.engine.sample_rate)
                responses.append(
                    pb.InferenceResponse(
                        output_tensors=outputs(pb, audio, self.engine.sample_rate, True)
                    )
                )
            except Exception as err:  # this request fails; the rest of the batch does not
                message = str(err) if isinstance(err, RequestError) else f"synthesis failed: {err}"
                responses.append(pb.InferenceResponse(error=pb.TritonError(message)))
            finally:
                self.metrics.inflight.increment(-1)
        return responses
