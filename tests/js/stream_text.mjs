// The AI SDK's streamText with @ai-sdk/xai against grokgate: one step (the SDK's default stopWhen) with one tool,
// at the user's defaults (tool choice auto, no temperature). Prints one JSON object on stdout: the stream's tool
// calls, tool results and errors, what the tool's execute received, and the finish reason; tests/ asserts on it.
// Usage: node stream_text.mjs <base URL, e.g. http://127.0.0.1:8000/v1> <token> [responses|chat] [auto|required]
//        [prompt]
import { streamText, tool } from "ai";
import { createXai } from "@ai-sdk/xai";
import { z } from "zod";

const [baseURL, apiKey, api = "responses", toolChoice = "auto", prompt = "What is the weather in Paris?"] =
  process.argv.slice(2);
const xai = createXai({ baseURL, apiKey });
// @ai-sdk/xai 5 serves streamText through xAI's Responses API; the chat-completions model (the one that takes
// each streamed tool-call delta as a whole call, as xAI sends them) is the 4.x line's xai.chat, installed
// under the alias @ai-sdk/xai-chat.
const model = api === "chat" ? (await import("@ai-sdk/xai-chat")).createXai({ baseURL, apiKey }).chat("grok-3")
  : xai("grok-3");

const executed = [];
const result = streamText({
  model,
  prompt,
  toolChoice,
  maxOutputTokens: 120,
  maxRetries: 0,
  tools: {
    get_weather: tool({
      description: "Get the current weather of a city.",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        executed.push({ city });
        return { city, sky: "sunny", temperature_c: 21 };
      },
    }),
  },
});

const out = { calls: [], results: [], errors: [], executed, text: "", finishReason: null, rawFinishReason: null };
for await (const part of result.fullStream) {
  if (part.type === "tool-call") out.calls.push({ name: part.toolName, input: part.input, invalid: !!part.invalid });
  else if (part.type === "tool-result") out.results.push({ name: part.toolName, input: part.input, output: part.output });
  else if (part.type === "tool-error" || part.type === "error") out.errors.push(String(part.error?.message ?? part.error));
  else if (part.type === "text-delta") out.text += part.text ?? part.delta ?? "";
  else if (part.type === "finish-step" || part.type === "finish") {
    out.finishReason = part.finishReason;
    out.rawFinishReason = part.rawFinishReason ?? out.rawFinishReason;
  }
}
process.stdout.write(JSON.stringify(out) + "\n");
