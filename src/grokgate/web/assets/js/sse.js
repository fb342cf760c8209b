// Server-sent events over fetch(): EventSource cannot send an Authorization header, so the console reads the
// response body itself. Yields the data of each event as it arrives; comments (": keep-alive") are skipped.

export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n/g, "\n"); // on the buffer: a CR may end one read
      let end = buffer.indexOf("\n\n");
      while (end >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
        end = buffer.indexOf("\n\n");
      }
    }
  } finally {
    // Leaving early (Stop, an error event) cancels the body, which closes the connection: the gateway sees the
    // client go, stops the generation and bills only what was produced.
    reader.cancel().catch(() => {});
  }
}
