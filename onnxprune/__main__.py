from onnxprune.launch import main

main()
