"""Streaming TTS (decoupled): one response per chunk of audio, as soon as it is made.

With the chunked engine, `execute` hands each request to the instance's scheduler
(`serving.worker`) and returns: one thread runs the chunks of all open streams, the
live ones first, bulk ones (from `tts_batch`) in what is left. With the sentence
engine, requests run one after the other, a response per sentence.
"""

import json
import time

import triton_python_backend_utils as pb

from ttsfleet.serving.backend import (
    Metrics,
    TritonSink,
    batch_sizes,
    cut_short,
    error_message,
    lanes,
    load,
    outputs,
    read_request,
    wide_engine,
)
from ttsfleet.serving.streaming import ChunkedSynthesizer
from ttsfleet.serving.worker import Worker


class TritonPythonModel:
    def initialize(self, args):
        self.engine, name = load(pb, args)
        if not pb.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb.TritonModelException(f"{name} must be decoupled")
        self.metrics = Metrics(pb, name)
        self.worker = None
        if isinstance(self.engine, ChunkedSynthesizer):
            self.worker = Worker(
                self.engine,
                sizes=batch_sizes(args),
                lanes=lanes(args),
                wide=wide_engine(self.engine),
                cut=cut_short(args),
            ).start()

    def execute(self, requests):
        for request in requests:
            if self.worker is not None:
                self._submit(request)
            else:
                self._sentences(request)

    def _submit(self, request):
        sink = TritonSink(pb, request, self.metrics, self.engine.sample_rate)
        try:
            req = read_request(pb, request, self.engine.voice_name)
            sink.admitted(bulk=req.priority == "bulk")
            self.worker.submit(req.text, req.rate, sink, req.priority)
        except Exception as err:  # the stream must always end, with the reason
            sink.end(error_message(err))

    def _sentences(self, request):
        arrived = time.perf_counter()
        sender = request.get_response_sender()
        self.metrics.inflight.increment(1)
        try:
            req = read_request(pb, request, self.engine.voice_name)
            first = True
            # A cancelled request (the client went, or barged in) stops at the next sentence.
            for audio in self.engine.chunks(req.text, req.rate, request.is_cancelled):
                sender.send(
                    pb.InferenceResponse(
                        output_tensors=outputs(pb, audio, self.engine.sample_rate, False)
                    )
                )
                if first:
                    self.metrics.ttfa.observe(time.perf_counter() - arrived)
                    first = False
                self.metrics.audio_seconds.increment(len(audio) / self.engine.sample_rate)
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # the stream must always end, with the reason
            try:
                sender.send(
                    pb.InferenceResponse(error=pb.TritonError(error_message(err))),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            except Exception:  # the client is gone (cancelled): nothing to tell
                pb.Logger.log_warn(f"could not send the error: {err}")
        finally:
            self.metrics.inflight.increment(-1)

    def finalize(self):
        if self.worker is not None:
            self.worker.stop()
